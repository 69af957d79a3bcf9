"""Write the Fashion-MNIST subset that ships in the repo (assets/fashion-mnist) from the Debian package.

    python benchmarks/fashion-mnist/make_assets.py        # the defaults are what assets/fashion-mnist holds

train/: the first --train images of the training split (used for finetuning in recipes/quickstart.toml);
test/: the first --test images of the test split (the FID/KID reference; never trained on). Images are resized
28 -> --resolution with deme's own transform (PIL bilinear) and saved as 8-bit grayscale PNGs named by their index
in the split; labels-<split>.csv lists index, label and class name. The data-set licence goes next to them.

holdout/ (with --holdout K > 0): the LAST K images of the training split, disjoint from train/ (train + holdout must
not exceed 60,000): a held-out slice of the training set, e.g. for the merge weight search of the reproduction
benchmark (benchmarks/fashion-mnist/run.py), so that no choice is ever tuned on the test set.

    python benchmarks/fashion-mnist/make_assets.py --out runs/fmnist-bench/data --train 55000 --holdout 5000 --test 10000
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402

LICENSE = """Fashion-MNIST (c) 2017 Zalando SE, https://tech.zalando.com

The MIT License (MIT) / Expat (as distributed by Debian in the package dataset-fashion-mnist)

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def write_split(split: str, count: int, resolution: int, out: Path, data_dir: Path, holdout: bool = False) -> None:
    """The first `count` images of `split` into out/<split>/ (holdout: the last `count` training images into
    out/holdout/); files are named by their index in the split."""
    from PIL import Image

    x, y = fmnist.load(split, data_dir)
    indices = range(len(x) - count, len(x)) if holdout else range(count)
    x = fmnist.resize(x[indices.start:indices.stop], resolution)
    name = "holdout" if holdout else split
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, img in zip(indices, x):
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png", optimize=True)
    with open(out / f"labels-{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "class"])
        for i in indices:
            w.writerow([i, int(y[i]), fmnist.CLASSES[y[i]]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=fmnist.DEFAULT_DIR, help="folder with the IDX .gz files")
    p.add_argument("--out", type=Path, default=Path("assets/fashion-mnist"))
    p.add_argument("--train", type=int, default=2000, help="first K training images")
    p.add_argument("--test", type=int, default=400, help="first K test images")
    p.add_argument("--holdout", type=int, default=0,
                   help="last K training images into holdout/ (disjoint from train/); 0: none")
    p.add_argument("--resolution", type=int, default=16, help="pixels (28 -> resolution, PIL bilinear)")
    args = p.parse_args(argv)
    if args.train + args.holdout > 60000:
        p.error(f"--train {args.train} + --holdout {args.holdout} exceeds the 60,000 training images")
    args.out.mkdir(parents=True, exist_ok=True)
    write_split("train", args.train, args.resolution, args.out, args.data_dir)
    if args.holdout:
        write_split("train", args.holdout, args.resolution, args.out, args.data_dir, holdout=True)
    write_split("test", args.test, args.resolution, args.out, args.data_dir)
    (args.out / "LICENSE").write_text(LICENSE)
    held = f", {args.holdout} held-out train" if args.holdout else ""
    print(f"wrote {args.train} train{held} and {args.test} test images at {args.resolution} px to {args.out}")


if __name__ == "__main__":
    main()
