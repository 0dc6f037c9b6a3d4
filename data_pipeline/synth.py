"""Synthetic stories: recurring named characters on changing backgrounds, drawn with PIL.

Written in the StoryStream layout so `seed-story data build` ingests them like the real thing:

    OUT/train.jsonl     {"id", "images": [rel paths], "captions": [...], "orders": [...]} per story
    OUT/val.jsonl       (with --val-stories)
    OUT/images/<id>/<id>_<frame>.png
    OUT/truth.json      per story: per frame the scene and each visible character (name, shape,
                        colour, centre, bbox in [0, 1] image coordinates, size, mood, draw order)
    OUT/synth.json      the arguments, so a set can be regenerated bit for bit

Each story gives its characters a fresh shape and colour; only the first caption says what they
look like, and moves are told relative to where a character was ("Pip moves to the left"). So a
model that draws frame t+1 well has to use the captions *and* the earlier frames — the point of
SEED-Story. Characters are flat, unantialiased, saturated colours on muted backgrounds, so
`score_frame` can find them by colour alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from seed_story_jax.atomic import atomic_path

NAMES = ("Pip", "Bo", "Kiki", "Max", "Luna", "Tom", "Zed", "Ada")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "pentagon")
# Saturated and pairwise far apart (> 90 in RGB), and far from every background colour below.
COLOURS = {
    "red": (230, 40, 40),
    "blue": (40, 80, 230),
    "yellow": (245, 205, 30),
    "magenta": (215, 50, 200),
    "orange": (250, 130, 20),
    "cyan": (30, 200, 215),
    "purple": (120, 50, 180),
    "lime": (130, 230, 40),
}
# name: (sky/wall, ground/floor, horizon as a fraction of the height)
SCENES = {
    "park": ((165, 205, 235), (100, 140, 95), 0.6),
    "beach": ((185, 215, 240), (215, 200, 160), 0.6),
    "night": ((25, 30, 60), (55, 60, 75), 0.6),
    "snowy hill": ((200, 210, 225), (240, 240, 245), 0.55),
    "desert": ((235, 220, 185), (195, 165, 120), 0.6),
    "living room": ((200, 185, 165), (140, 110, 90), 0.65),
}
MOODS = ("happy", "sad", "surprised", "sleepy")
SIZES = {"small": 0.14, "medium": 0.2, "big": 0.28}  # diameter as a fraction of the image side
XS = (0.15, 0.325, 0.5, 0.675, 0.85)  # horizontal slots
GROUND_Y, AIR_Y = 0.74, 0.38
PLACE_WORDS = ("on the far left", "on the left", "in the middle", "on the right", "on the far right")


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    """How stories are drawn; the defaults are the generator every test and benchmark uses.

    size_scale: character diameters are SIZES × this (the demo's 32-px frames need bigger ones:
    at scale 1 a small character is 4 px). faces: the black eyes and mouth, which at a few pixels
    cover most of a small character and hide its colour. min_chars / max_chars: characters per story.
    scenes: the scenes stories use (None: all of SCENES); with one, nobody changes scene.
    away: (min, max) frames a character who leaves stays away before it comes back, named but its
    look not restated ("Pip comes back from the left."), so painting it again needs a memory of
    how it looked; None: the default generator (leaving and entering at random, the look told
    on every entrance)."""

    size_scale: float = 1.0
    faces: bool = True
    min_chars: int = 2
    max_chars: int = 3
    scenes: Optional[tuple] = None
    away: Optional[tuple] = None

    def __post_init__(self):
        if not 0.25 <= self.size_scale <= 3.0:
            raise ValueError(f"size_scale must be in [0.25, 3], got {self.size_scale}")
        if not 1 <= self.min_chars <= self.max_chars <= len(NAMES):
            raise ValueError(f"need 1 <= min_chars <= max_chars <= {len(NAMES)}, got {self.min_chars}, {self.max_chars}")
        if self.scenes is not None:
            object.__setattr__(self, "scenes", tuple(self.scenes))
            bad = [x for x in self.scenes if x not in SCENES]
            if bad or not self.scenes:
                raise ValueError(f"scenes must be a non-empty subset of {list(SCENES)}, got {list(self.scenes)}")
        if self.away is not None:
            object.__setattr__(self, "away", tuple(int(x) for x in self.away))
            if len(self.away) != 2 or not 1 <= self.away[0] <= self.away[1]:
                raise ValueError(f"away must be (min, max) frames with 1 <= min <= max, got {list(self.away)}")

    @property
    def scene_names(self) -> tuple:
        return tuple(self.scenes) if self.scenes is not None else tuple(SCENES)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SynthOptions":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown synth option(s) {bad}; known: {sorted(known)}")
        return cls(**d)


@dataclasses.dataclass
class Character:
    name: str
    shape: str
    colour: str
    slot: int = 2
    up: bool = False
    size: str = "medium"
    mood: str = "happy"
    present: bool = True
    scale: float = 1.0  # SynthOptions.size_scale
    seen: bool = False  # has been on stage (SynthOptions.away: comes back without its look told)
    back_at: int = -1  # SynthOptions.away: the frame it comes back in

    @property
    def rgb(self):
        return COLOURS[self.colour]

    def geometry(self):
        """(cx, cy, r) in [0, 1] image units."""
        r = SIZES[self.size] * self.scale / 2
        cy = (AIR_Y if self.up else GROUND_Y)
        cy = min(cy, 1.0 - r - 0.02)
        return XS[self.slot], cy, r


def _join(names):
    names = list(names)
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


class _Story:
    """One story's state machine: events change the state, each frame is drawn from the state."""

    def __init__(self, rng: np.random.Generator, n_chars: int, options: SynthOptions = SynthOptions()):
        idx = rng.permutation(len(NAMES))[:n_chars]
        shapes = rng.permutation(len(SHAPES))[:n_chars]
        colours = rng.permutation(len(COLOURS))[:n_chars]
        cnames = list(COLOURS)
        self.options = options
        self.chars = [Character(NAMES[i], SHAPES[s], cnames[c], scale=options.size_scale)
                      for i, s, c in zip(idx, shapes, colours)]
        self.rng = rng
        self.scene = options.scene_names[rng.integers(len(options.scene_names))]
        # The last character may wait off stage and enter later.
        slots = sorted(rng.choice(len(XS), size=n_chars, replace=False).tolist())
        rng.shuffle(slots)
        for c, s in zip(self.chars, slots):
            c.slot = int(s)
            c.mood = MOODS[rng.integers(len(MOODS))]
            c.size = list(SIZES)[rng.integers(len(SIZES))]
        if n_chars > 2 and rng.random() < 0.6:
            self.chars[-1].present = False
        self.t = 0
        for c in self.here():
            c.seen = True

    def here(self):
        return [c for c in self.chars if c.present]

    def _free_slot_near(self, c, target):
        taken = {o.slot for o in self.here() if o is not c}
        for d in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            s = target + d
            if 0 <= s < len(XS) and s not in taken:
                return s
        return c.slot

    def intro(self) -> str:
        parts = []
        for c in sorted(self.here(), key=lambda c: c.slot):
            parts.append(f"{c.name}, a {c.mood} {c.size} {c.colour} {c.shape}, is {PLACE_WORDS[c.slot]}")
        return f"In the {self.scene}, " + "; ".join(parts) + "."

    def step(self) -> str:
        """Apply one or two random events; return the caption."""
        rng = self.rng
        self.t += 1
        timed = self.options.away is not None
        here = self.here()
        away = [c for c in self.chars if not c.present and not (timed and c.seen)]
        sentences = []
        # Whoever was in the air lands first: the story tells it.
        for c in here:
            if c.up:
                c.up = False
                sentences.append(f"{c.name} lands.")
        if timed:  # whoever's time away is up comes back first
            for c in self.chars:
                if not c.present and c.seen and c.back_at <= self.t:
                    sentences.append(self._enter(c))
            here = self.here()
        for _ in range(1 + int(rng.random() < 0.35)):
            events = ["move", "move", "meet", "jump", "grow", "shrink", "mood", "mood"]
            if len(self.options.scene_names) > 1:
                events.append("scene")
            if away:
                events += ["enter", "enter"]
            if len(here) > 2 or (timed and len(here) > 1):
                events += ["leave"] * (2 if timed else 1)
            ev = events[rng.integers(len(events))]
            sentences.append(self._event(ev))
            here = self.here()
            away = [c for c in self.chars if not c.present and not (timed and c.seen)]
        names = _join(c.name for c in sorted(here, key=lambda c: c.slot))
        sentences.append(f"Now {names} {'is' if len(here) == 1 else 'are'} in the {self.scene}.")
        return " ".join(s for s in sentences if s)

    def _event(self, ev: str) -> str:
        rng = self.rng
        here = self.here()
        c = here[rng.integers(len(here))]
        if ev == "move":
            d = int(rng.choice([-2, -1, 1, 2]))
            target = int(np.clip(c.slot + d, 0, len(XS) - 1))
            new = self._free_slot_near(c, target)
            if new == c.slot:
                return f"{c.name} stays put."
            far = abs(new - c.slot) > 1
            way = "left" if new < c.slot else "right"
            c.slot = new
            return f"{c.name} {'runs far' if far else 'moves'} to the {way}."
        if ev == "meet" and len(here) >= 2:
            others = [o for o in here if o is not c]
            o = others[rng.integers(len(others))]
            target = o.slot - 1 if c.slot < o.slot else o.slot + 1
            c.slot = self._free_slot_near(c, int(np.clip(target, 0, len(XS) - 1)))
            return f"{c.name} walks over to {o.name} and they meet."
        if ev == "jump":
            c.up = True
            return f"{c.name} jumps up high."
        if ev == "grow":
            order = list(SIZES)
            i = order.index(c.size)
            if i == len(order) - 1:
                return f"{c.name} is as big as can be."
            c.size = order[i + 1]
            return f"{c.name} grows bigger."
        if ev == "shrink":
            order = list(SIZES)
            i = order.index(c.size)
            if i == 0:
                return f"{c.name} is very small."
            c.size = order[i - 1]
            return f"{c.name} shrinks."
        if ev == "mood":
            choices = [m for m in MOODS if m != c.mood]
            c.mood = choices[rng.integers(len(choices))]
            return f"{c.name} becomes {c.mood}."
        if ev == "scene":
            choices = [s for s in self.options.scene_names if s != self.scene]
            self.scene = choices[rng.integers(len(choices))]
            return f"Everyone goes to the {self.scene}."
        timed = self.options.away is not None
        if ev == "enter" and any(not o.present and not (timed and o.seen) for o in self.chars):
            away = [o for o in self.chars if not o.present and not (timed and o.seen)]
            return self._enter(away[rng.integers(len(away))])
        if ev == "leave" and ((len(here) > 2 and not timed) or (timed and len(here) > 1 and c.back_at < self.t)):
            c.present = False
            if timed:
                c.back_at = self.t + int(rng.integers(self.options.away[0], self.options.away[1] + 1))
            return f"{c.name} says goodbye and leaves."
        return self._event("mood")

    def _enter(self, o: Character) -> str:
        side = int(self.rng.integers(2))
        o.present = True
        o.up = False
        o.slot = self._free_slot_near(o, 0 if side == 0 else len(XS) - 1)
        where = "left" if side == 0 else "right"
        if self.options.away is not None and o.seen:
            o.back_at = self.t  # (not gone again in the frame it is back)
            return f"{o.name} comes back from the {where}."
        if self.options.away is not None:
            o.back_at = self.t
        o.seen = True
        return f"{o.name}, a {o.colour} {o.shape}, arrives from the {where}."


# ------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float):
    def ring(n, start, radius=r):
        return [(cx + radius * math.cos(start + 2 * math.pi * k / n), cy + radius * math.sin(start + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return ring(3, -math.pi / 2)
    if shape == "diamond":
        return ring(4, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, 0)
    if shape == "pentagon":
        return ring(5, -math.pi / 2)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        a, b = r, r * 0.38
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def _draw_face(d, c: Character, cx, cy, r, size):
    """Tiny face in black; at 64 px it is a few pixels, at 512 px it reads as a mood."""
    ew = max(1.0, r * 0.12)
    ex, ey = r * 0.35, cy - r * 0.15
    black = (0, 0, 0)
    for sx in (-1, 1):
        x = cx + sx * ex
        if c.mood == "sleepy":
            d.line([(x - ew * 1.5, ey), (x + ew * 1.5, ey)], fill=black, width=max(1, int(ew)))
        else:
            d.rectangle([x - ew, ey - ew, x + ew, ey + ew], fill=black)
    my, mw = cy + r * 0.3, r * 0.4
    lw = max(1, int(r * 0.1))
    if c.mood == "happy":
        d.line([(cx - mw, my - r * 0.1), (cx, my + r * 0.1), (cx + mw, my - r * 0.1)], fill=black, width=lw)
    elif c.mood == "sad":
        d.line([(cx - mw, my + r * 0.1), (cx, my - r * 0.1), (cx + mw, my + r * 0.1)], fill=black, width=lw)
    elif c.mood == "surprised":
        a = max(1.0, r * 0.15)
        d.rectangle([cx - a, my - a, cx + a, my + a], fill=black)
    else:
        d.line([(cx - mw * 0.6, my), (cx + mw * 0.6, my)], fill=black, width=lw)


def draw_frame(story: _Story, size: int):
    """(PIL image, truth dict) for the current state."""
    from PIL import Image, ImageDraw

    sky, ground, horizon = SCENES[story.scene]
    img = Image.new("RGB", (size, size), sky)
    d = ImageDraw.Draw(img)
    hy = int(round(horizon * size))
    d.rectangle([0, hy, size, size], fill=ground)
    if story.scene == "night":  # a moon, in a colour no character has
        m = size * 0.06
        d.ellipse([size * 0.8 - m, size * 0.15 - m, size * 0.8 + m, size * 0.15 + m], fill=(235, 235, 215))
    chars = []
    # Smaller characters in front, so a big one never hides a small one entirely.
    order = sorted(story.here(), key=lambda c: (-SIZES[c.size], c.slot))
    for z, c in enumerate(order):
        cx, cy, r = c.geometry()
        px, py, pr = cx * size, cy * size, r * size
        if c.shape == "circle":
            d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=c.rgb)
        else:
            d.polygon(_polygon(c.shape, px, py, pr), fill=c.rgb)
        if story.options.faces:
            _draw_face(d, c, px, py, pr, size)
        chars.append({
            "name": c.name, "shape": c.shape, "colour": c.colour, "rgb": list(c.rgb),
            "centre": [round(cx, 4), round(cy, 4)],
            "bbox": [round(cx - r, 4), round(cy - r, 4), round(cx + r, 4), round(cy + r, 4)],
            "radius": round(r, 4), "size": c.size, "mood": c.mood, "slot": c.slot, "up": c.up, "z": z,
        })
    truth = {"scene": story.scene, "sky": list(sky), "ground": list(ground), "horizon": horizon,
             "characters": chars}
    return img, truth


def _play(seed: int, index: int, frames: int, options: Optional[SynthOptions]):
    """The story of (seed, index, options), frame by frame: yields (t, state, caption)."""
    o = options or SynthOptions()
    rng = np.random.default_rng([seed, index])
    story = _Story(rng, n_chars=int(rng.integers(o.min_chars, o.max_chars + 1)), options=o)
    for t in range(frames):
        yield t, story, story.intro() if t == 0 else story.step()


def make_story(seed: int, index: int, frames: int, size: int, options: Optional[SynthOptions] = None):
    """Deterministic in (seed, index, options): (list of PIL images, captions, truths)."""
    images, captions, truths = [], [], []
    for _, story, caption in _play(seed, index, frames, options):
        img, truth = draw_frame(story, size)
        images.append(img)
        captions.append(caption)
        truths.append(truth)
    return images, captions, truths


def recoloured_frames(seed: int, index: int, frames: int, size: int, options: Optional[SynthOptions],
                      names_at: dict) -> dict:
    """Frame t → make_story's frame t with the characters `names_at[t]` in colours no character of
    the story has (the j-th named at t gets the unused colour (t + j) mod their number): what a
    painter that lost those characters' look would at best paint. The story itself is unchanged."""
    out = {}
    for t, story, _ in _play(seed, index, frames, options):
        if t not in names_at:
            continue
        unused = [k for k in COLOURS if k not in {c.colour for c in story.chars}]
        if not unused:
            raise ValueError(f"story {index}: every colour is taken, none left to recolour with")
        chars = [c for c in story.chars if c.name in set(names_at[t])]
        saved = [c.colour for c in chars]
        for j, c in enumerate(chars):
            c.colour = unused[(t + j) % len(unused)]
        out[t], _ = draw_frame(story, size)
        for c, colour in zip(chars, saved):
            c.colour = colour
    return out


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic(out, *, stories: int, frames: int = 10, size: int = 64, seed: int = 0,
                    val_stories: int = 0, progress: bool = True, overwrite: bool = False,
                    options: Optional[SynthOptions] = None) -> dict:
    """Write a synthetic StoryStream-format set to `out` (atomic). Returns a summary."""
    options = options or SynthOptions()
    if stories < 1 or frames < 2 or size < 16 or val_stories < 0:
        raise ValueError("need stories >= 1, frames >= 2, size >= 16, val_stories >= 0")
    from tqdm.auto import tqdm

    total = stories + val_stories
    with atomic_path(out, directory=True, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        files = {"train": open(tmp / "train.jsonl", "w"), "val": open(tmp / "val.jsonl", "w") if val_stories else None}
        truth = []
        try:
            for i in tqdm(range(total), desc="synth stories", disable=not progress):
                split = "train" if i < stories else "val"
                images, captions, truths = make_story(seed, i, frames, size, options)
                sdir = tmp / "images" / f"{i:06d}"
                sdir.mkdir()
                rels = []
                for t, img in enumerate(images):
                    rel = f"{i:06d}/{i:06d}_{t:03d}.png"
                    (tmp / "images" / rel).write_bytes(_png(img))
                    rels.append(rel)
                files[split].write(json.dumps({"id": i, "images": rels, "captions": captions,
                                               "orders": list(range(frames))}) + "\n")
                truth.append({"id": i, "split": split, "images": rels, "frames": truths})
        finally:
            for f in files.values():
                if f is not None:
                    f.close()
        summary = {"stories": stories, "val_stories": val_stories, "frames": frames, "size": size, "seed": seed,
                   "images": total * frames}
        if options != SynthOptions():
            summary["options"] = dataclasses.asdict(options)
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2))
        # Not *.jsonl: `data build --jsonl OUT` reads every *.jsonl below OUT.
        (tmp / "truth.json").write_text(json.dumps({"size": size, "stories": truth}))
    return summary


def load_truth(out) -> dict:
    """image relative path → that frame's truth dict (as written to truth.json)."""
    table = {}
    for rec in json.loads((Path(out) / "truth.json").read_text())["stories"]:
        for rel, fr in zip(rec["images"], rec["frames"]):
            table[rel] = fr
    return table


# ------------------------------------------------------------------------------------------
# scoring (for evaluation of generated frames)
# ------------------------------------------------------------------------------------------


def _colour_mask(arr: np.ndarray, rgb, tol: float) -> np.ndarray:
    diff = arr.astype(np.float32) - np.asarray(rgb, np.float32)
    return np.sqrt((diff * diff).sum(-1)) <= tol


def score_frame(image, truth: dict, *, tol: float = 60.0, min_fraction: float = 0.25) -> dict:
    """Score a (generated) frame against one frame's truth, finding characters by colour alone.

    image: PIL image or (H, W, 3) uint8 array, any size (truth is in [0, 1] coordinates).
    A character is found when at least `min_fraction` of its expected area has its colour (within
    `tol` in RGB). For found characters: centre error (distance between the colour mass centroid
    and the true centre, in image widths) and IoU of the colour bbox with the true bbox. Colours of
    the palette that appear (same rule, medium-size area) but belong to no visible character are
    false positives. The background is right when the median colour above and below the horizon
    is within `tol` of the scene's sky and ground.
    """
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    ys = (ys + 0.5) / h
    xs = (xs + 0.5) / w
    per = {}
    truth_colours = set()
    for c in truth["characters"]:
        truth_colours.add(c["colour"])
        m = _colour_mask(arr, c["rgb"], tol)
        r = c["radius"]
        expected = math.pi * r * r * h * w * 0.6  # the polygons cover roughly 0.6–1.0 of the circle
        n = int(m.sum())
        found = n >= min_fraction * expected
        entry = {"found": bool(found), "pixels": n, "expected_pixels": round(expected, 1)}
        if found:
            cx, cy = float(xs[m].mean()), float(ys[m].mean())
            entry["centre_error"] = round(math.hypot(cx - c["centre"][0], cy - c["centre"][1]), 4)
            box = [float(xs[m].min()) - 0.5 / w, float(ys[m].min()) - 0.5 / h,
                   float(xs[m].max()) + 0.5 / w, float(ys[m].max()) + 0.5 / h]
            entry["iou"] = round(_iou(box, c["bbox"]), 4)
        per[c["name"]] = entry
    extras = []
    medium = math.pi * (SIZES["small"] / 2) ** 2 * h * w * 0.6 * min_fraction
    for name, rgb in COLOURS.items():
        if name not in truth_colours and _colour_mask(arr, rgb, tol).sum() >= medium:
            extras.append(name)
    hy = int(round(truth["horizon"] * h))
    sky_ok = bool(np.linalg.norm(np.median(arr[: max(1, hy // 3)].reshape(-1, 3), 0) - truth["sky"]) <= tol)
    ground_ok = bool(np.linalg.norm(np.median(arr[min(h - 1, hy + (h - hy) * 2 // 3):].reshape(-1, 3), 0)
                                    - truth["ground"]) <= tol)
    n_true = len(truth["characters"])
    found = [e for e in per.values() if e["found"]]
    recall = len(found) / n_true if n_true else 1.0
    precision = len(found) / (len(found) + len(extras)) if (found or extras) else 1.0
    return {
        "characters": per,
        "recall": recall,
        "precision": precision,
        "extra_colours": extras,
        "mean_centre_error": float(np.mean([e["centre_error"] for e in found])) if found else None,
        "mean_iou": float(np.mean([e["iou"] for e in found])) if found else None,
        "background_ok": sky_ok and ground_ok,
        "sky_ok": sky_ok,
        "ground_ok": ground_ok,
    }


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
