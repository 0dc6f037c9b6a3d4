"""Training-input throughput: our grain pipeline (ArrayRecord → SEED-Story samples at 448 px) against
a plain-PyTorch rendition of the original's `decode_long_story_data` + torch DataLoader, same files,
same worker count, same machine, same run.

    python benchmarks/data.py                    # 2 workers, stage 2, 448 px, batch 4,
                                                 # 40 synthetic stories of 10 JPEG frames 768×432

The reference does what the original does per sample (spec §5.2): parse a jsonl line, open and
decode all 10 frames with PIL, torchvision's PIL path (bilinear `Resize((448, 448))`, ToTensor,
Normalize) on every frame, keep the first g+2, tokenize, build masks; the original collate
concatenates the images. Ours decodes only the g+2 frames a sample uses and pads them to 10
static slots. Throughput is samples/s over `--batches` batches after the first (worker start-up
is reported separately). The ratio is ours / reference (> 1: ours is faster). CPU seconds per
sample in a single process are reported too: on a shared machine they vary less than wall time.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def make_data(root: Path, stories: int, frame_w: int, frame_h: int, seed: int = 0) -> dict:
    """Synthetic stories re-encoded as StoryStream-like JPEG frames; built into ArrayRecord."""
    from PIL import Image

    from data_pipeline import builder, storystream as ss, synth

    synth.write_synthetic(root / "synth", stories=stories, frames=10, size=frame_h, seed=seed, progress=False)
    img_root = root / "images"
    lines = []
    for line in (root / "synth" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rels = []
        for rel in rec["images"]:
            out = img_root / Path(rel).with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(root / "synth" / "images" / rel).convert("RGB").resize((frame_w, frame_h), Image.BICUBIC) \
                .save(out, quality=90)
            rels.append(str(Path(rel).with_suffix(".jpg")))
        rec["images"] = rels
        lines.append(json.dumps(rec))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    builder.build(root / "train.jsonl", img_root, root / "ds", limits=ss.ImageLimits(128, 0.2), progress=False)
    caps = [c for line in lines for c in json.loads(line)["captions"]]
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(root / "tok", caps, 1000)
    return {"frame": f"{frame_w}x{frame_h} JPEG q90", "stories": stories}


# ------------------------------------------------------------------------------------------
# the reference: the original's per-sample work in plain PyTorch (torchvision's PIL path inlined)
# ------------------------------------------------------------------------------------------

class ReferenceStories:
    """torch map-style dataset over jsonl lines doing `decode_long_story_data`'s work."""

    def __init__(self, jsonl: Path, image_dir: Path, tok_dir: Path, size: int, max_length: int, n_img: int):
        self.lines = jsonl.read_text().splitlines()
        self.image_dir, self.tok_dir = image_dir, tok_dir
        self.size, self.max_length, self.n_img = size, max_length, n_img
        self.tok = None

    def __len__(self):
        return 10 ** 9  # cycled, like the original's datapipe

    def _transform(self, img):
        import numpy as np
        import torch
        from PIL import Image

        img = img.resize((self.size, self.size), Image.BILINEAR)  # torchvision Resize on PIL input
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
        return (x - mean) / std

    def __getitem__(self, i):
        import torch
        from PIL import Image

        from seed_story_jax.tokenizer import Tokenizer

        if self.tok is None:
            self.tok = Tokenizer.load(self.tok_dir)
        rec = json.loads(self.lines[i % len(self.lines)])
        n = len(rec["images"])
        g = random.randint(0, n - 2)
        images = [Image.open(os.path.join(self.image_dir, p)).convert("RGB") for p in rec["images"]]
        images = torch.stack([self._transform(im) for im in images])[: g + 2]
        im = "<img>" + "".join(f"<img_{k:05d}>" for k in range(self.n_img)) + "</img>"
        caps = rec["captions"]
        instruction = caps[0] + im + "".join("[INST]" + caps[k + 1] + im for k in range(g))
        response = "[INST]" + caps[g + 1] + im
        a, b = self.tok.encode(instruction), self.tok.encode(response)
        ids = [self.tok.bos_id] + a + b + [self.tok.eos_id]
        labels = [-100] * (1 + len(a)) + b + [self.tok.eos_id]
        pad = self.max_length - len(ids)
        ids = torch.tensor(ids + [self.tok.pad_id] * pad)
        labels = torch.tensor(labels + [-100] * pad)
        boi = torch.where(ids == self.tok.boi_id)[0].tolist()
        eoi = torch.where(ids == self.tok.eoi_id)[0].tolist()
        cmp = torch.zeros(self.max_length, dtype=torch.bool)
        for s, e in zip(boi[:-1], eoi[:-1]):
            cmp[s + 1:e] = True
        gen = torch.zeros(self.max_length, dtype=torch.bool)
        gen[boi[-1] + 1:eoi[-1]] = True
        labels[boi[-1] + 1:eoi[-1] + 1] = -100
        return {"input_ids": ids, "labels": labels, "ids_cmp_mask": cmp, "ids_gen_mask": gen, "images": images,
                "embeds_cmp_mask": torch.tensor([True] * (g + 1) + [False]),
                "embeds_gen_mask": torch.tensor([False] * (g + 1) + [True])}


def reference_collate(batch):
    import torch

    out = {}
    for k in batch[0]:
        cat = k in ("images", "embeds_cmp_mask", "embeds_gen_mask")
        out[k] = torch.cat([b[k] for b in batch]) if cat else torch.stack([b[k] for b in batch])
    return out


def run_reference(root: Path, args) -> dict:
    import torch

    ds = ReferenceStories(root / "train.jsonl", root / "images", root / "tok", args.image_size, args.max_length, 64)
    sampler = torch.utils.data.RandomSampler(range(10 ** 6), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=reference_collate, sampler=sampler,
                                         multiprocessing_context="spawn" if args.workers else None)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        b = next(it)
        n += b["input_ids"].shape[0]
    dt = time.perf_counter() - t
    try:  # torch 2.13's workers may abort ("terminate called without an active exception") when
        it._shutdown_workers()  # stopped mid-batch; that is teardown, after the measurement
    except RuntimeError as e:
        print(f"(reference teardown: {e})", file=sys.stderr)
    return {"impl": f"torch reference ({args.workers} workers)", "first_batch_s": first, "samples": n,
            "seconds": dt, "samples_per_s": n / dt}


def run_ours(root: Path, args) -> dict:
    from data_pipeline import pipeline
    from seed_story_jax.config import DataConfig

    pipeline.mark_flags_parsed()
    cfg = DataConfig(path=str(root / "ds"), stage=args.stage, max_length=args.max_length, num_img_tokens=64,
                     max_images=10, image_size=args.image_size, sd_size=1024, batch_size=args.batch_size,
                     workers=args.workers, worker_buffer_size=2, shuffle_seed=0)
    t0 = time.perf_counter()
    it = pipeline.make_iterator(cfg, str(root / "tok"), process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        b = next(it)
        n += b["input_ids"].shape[0]
    dt = time.perf_counter() - t
    pipeline.close_iterator(it)
    return {"impl": f"ours: grain ({args.workers} workers)", "first_batch_s": first, "samples": n, "seconds": dt,
            "samples_per_s": n / dt, "batch_bytes": int(sum(v.nbytes for v in b.values()))}


def cpu_per_sample(root: Path, args, n: int = 24) -> dict:
    """CPU seconds per sample in one process (no workers): the work itself, less sensitive to load."""
    import numpy as np
    import torch

    from data_pipeline import builder, pipeline
    from seed_story_jax.tokenizer import Tokenizer

    torch.set_num_threads(1)  # as in a DataLoader worker
    src = builder.StorySource(root / "ds")
    make = pipeline.MakeSample(Tokenizer.load(root / "tok"), stage=args.stage, max_length=args.max_length,
                               num_img_tokens=64, max_images=10, image_size=args.image_size, sd_size=1024)
    ref = ReferenceStories(root / "train.jsonl", root / "images", root / "tok", args.image_size, args.max_length, 64)
    rng = np.random.default_rng(0)
    random.seed(0)
    make.random_map(src[0], rng), ref[0]  # warm up (tokenizer load)
    t = time.process_time()
    for i in range(n):
        make.random_map(src[i % len(src)], rng)
    ours = (time.process_time() - t) / n
    t = time.process_time()
    for i in range(n):
        ref[i]
    return {"ours_cpu_s_per_sample": ours, "reference_cpu_s_per_sample": (time.process_time() - t) / n}


def main() -> int:
    p = common.parser("data", __doc__.splitlines()[0])
    p.add_argument("--stories", type=int, default=40)
    p.add_argument("--batches", type=int, default=20, help="timed batches after the first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-length", type=int, default=1280)
    p.add_argument("--stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--frame", default="768x432", help="source frame WxH (JPEG)")
    args = p.parse_args()
    fw, fh = (int(x) for x in args.frame.split("x"))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as d:
        root = Path(d)
        t = time.perf_counter()
        data = make_data(root, args.stories, fw, fh)
        setup_s = time.perf_counter() - t
        rows = [run_ours(root, args), run_reference(root, args)]
        cpu = cpu_per_sample(root, args)
    ratio = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
    print(common.table(rows, ["impl", "samples_per_s", "first_batch_s", "samples", "seconds"]))
    print(f"CPU per sample, one process: ours {cpu['ours_cpu_s_per_sample'] * 1e3:.1f} ms, "
          f"reference {cpu['reference_cpu_s_per_sample'] * 1e3:.1f} ms")
    print(f"ratio ours/reference: {ratio:.2f}x  (load avg before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; "
          f"{os.cpu_count()} CPUs)")
    record = {"benchmark": "data", "args": vars(args), "data": data, "setup_s": setup_s, "rows": rows,
              "ratio_ours_over_reference": ratio, "cpu_per_sample": cpu, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "machine": common.machine()}
    path = common.write_json(args.out, record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
