"""CLIP score: mean over image-prompt pairs of 100 * max(cos(image embedding, text embedding), 0) (Hessel et al.
2021 with w = 100, the scale the paper reports; torchmetrics clamps the mean instead of each pair, which only differs
when some cosine is negative).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- CLIP score --------------------------------------------------------------------------------------------------

def load_clip(spec: Optional[str], device):
    """(model, tokenizer, preprocess) from a local folder or a hub id; preprocess: list of PIL images -> tensor."""
    from transformers import AutoTokenizer, CLIPModel

    if not spec:
        raise UsageError("CLIP score needs a CLIP model; set eval.clip_model to a local folder or a hub id")
    try:
        model = CLIPModel.from_pretrained(spec).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the CLIP model '{spec}' ({str(e).splitlines()[0][:160]}); set "
                         f"eval.clip_model to a local folder with a CLIPModel and its tokenizer") from None
    return model, tokenizer, _clip_preprocess(spec, model.config.vision_config.image_size)


def _clip_preprocess(spec: str, size: int) -> Callable[[list], Any]:
    """The folder's CLIPImageProcessor when it has one, else resize (bicubic, short side; the long side truncated,
    as torchvision's Resize and transformers' processors do) + centre crop + CLIP normalisation at the vision tower's
    image_size."""
    import torch

    try:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(spec)
        return lambda ims: processor(images=ims, return_tensors="pt")["pixel_values"]
    except Exception:  # no preprocessor_config.json in the folder
        pass
    from PIL import Image

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)

    def preprocess(ims: list) -> Any:
        out = []
        for im in ims:
            w, h = im.size
            short = min(w, h)
            im = im.resize((max(size, int(size * w / short)), max(size, int(size * h / short))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)

    return preprocess


def clip_score(images: Sequence[Any], prompts: Sequence[str], clip, device=None, batch_size: int = 64) -> float:
    """Mean over pairs of 100 * max(cos(image, text), 0). images: PIL images, uint8 arrays or file paths."""
    import torch
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    model, tokenizer, preprocess = clip
    device = device or next(model.parameters()).device
    scores = []
    for s in range(0, len(images), batch_size):
        ims = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else
               (Image.fromarray(x).convert("RGB") if isinstance(x, np.ndarray) else x.convert("RGB"))
               for x in images[s:s + batch_size]]
        text = tokenizer(list(prompts[s:s + batch_size]), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                        pixel_values=preprocess(ims).to(device))
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        scores.append(100.0 * (img * txt).sum(-1).clamp(min=0).cpu())
    return float(torch.cat(scores).mean()) if scores else float("nan")
