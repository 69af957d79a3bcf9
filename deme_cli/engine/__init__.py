"""The engine: what every command shares (recipe, resolved base, models, training task and loss, ranges,
task vectors, denoising, data, checkpoints, run directory, metrics). Engine modules never import commands."""
