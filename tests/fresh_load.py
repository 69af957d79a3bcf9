"""Run as a script by the tests: load model folders with diffusers alone, in a process where deme cannot be imported,
and compare their images with the PNGs `deme sample` wrote.

    python tests/fresh_load.py JOBS.json  ->  prints one JSON line: [{"folder", "max_diff", "unet_class"}, ...]

Each job: {"folder", "pngs": [files, image k first], "seed", "steps", "prompts": [one per image] or null, "guidance",
"negative", "save_to": a folder for pipe.save_pretrained or null}. Image k is made alone from a generator seeded seed + k,
with DDIM built from the folder's own scheduler config (the recipes' sample.scheduler), fp32 on the CPU.
"""
import json
import sys

sys.modules["deme_cli"] = None          # deme cannot be imported: the folders must carry their own code

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402


def images(pipe, job) -> list:
    out = []
    for k in range(len(job["pngs"])):
        gen = torch.Generator().manual_seed(job["seed"] + k)
        kw = dict(generator=gen, num_inference_steps=job["steps"], output_type="np")
        if job.get("prompts"):
            res = pipe(job["prompts"][k], negative_prompt=job.get("negative"), guidance_scale=job["guidance"], **kw)
        else:
            res = pipe(batch_size=1, **kw)
        out.append(np.asarray(res.images[0] * 255).round().clip(0, 255))
    return out


def main() -> None:
    torch.set_num_threads(1)
    results = []
    for job in json.loads(open(sys.argv[1]).read()):
        pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        worst = 0.0
        for img, f in zip(images(pipe, job), job["pngs"]):
            ref = np.asarray(Image.open(f).convert("RGB" if img.shape[-1] == 3 else "L"), np.float64)
            worst = max(worst, float(np.abs(img.reshape(ref.shape) - ref).max()))
        if job.get("save_to"):
            pipe.save_pretrained(job["save_to"])
        results.append({"folder": job["folder"], "max_diff": worst, "pipeline": type(pipe).__name__,
                        "unet_class": type(pipe.unet).__name__})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
