"""Llama SentencePiece tokenizer + SEED-Story's 66 image tokens, with sentencepiece only.

The added tokens are `<img>` (BOI), `</img>` (EOI) and `<img_00000>` ... `<img_00063>`. Their ids
are read from the tokenizer directory, never assumed, in the order transformers 4.34 (SEED-Story's
pin) reads them:
  1. `tokenizer_config.json` -> `added_tokens_decoder` (ids and lstrip/rstrip/single_word/special
     flags), else
  2. `added_tokens.json` (ids; 4.34's slow loader then gives each token lstrip=rstrip=True), else
  3. `tokenizer.json` -> `added_tokens` (ids and flags).
Files that disagree about an id are an error. `Tokenizer.from_plain(dir)` / `add_image_tokens()`
append the 66 tokens after the vocabulary (32000 ... 32065 for Llama) with lstrip=rstrip=False.

Encoding reproduces the slow `LlamaTokenizer` of transformers 4.34 (`encode(text,
add_special_tokens=False)`): the text is split on the added tokens and on the special tokens
`<s>`, `</s>`, `<unk>` (leftmost-longest match), the lstrip/rstrip/single_word flags of each added
token trim whitespace around it, and each remaining text piece is SentencePiece-encoded on its own.
`legacy` comes from `tokenizer_config.json`; absent or null means True (4.34's default):

* legacy=True: every text piece gets SentencePiece's dummy prefix "▁", including the piece right
  after an added token: `"</img>[INST]"` -> `</img>`, `▁[`, `INST`, `]`; `"<img>Hello"` -> `<img>`,
  `▁Hello`.
* legacy=False: only the start of the text gets "▁"; a piece right after an added token is encoded
  without it (`</img>`, `[`, `INST`, `]`) unless it starts with a space; a leading "▁" before a
  special token at the very start is dropped.

Tests compare both modes with transformers 5.23 (`AutoTokenizer.from_pretrained(dir, legacy=...)`
and its SentencePiece backend). One known divergence of transformers 5's *fast* tokenizer, where we
follow 4.34/SentencePiece: a text piece that itself starts with a space ("<img> Hi") keeps both the
dummy "▁" and the space's "▁" here; the fast tokenizer merges them into one.

BOS/EOS are never added implicitly: `encode(text)` returns the text's ids, `encode(text, bos=True,
eos=True)` adds them. `pad_id` is the pad token's id from the files; when the files name no pad
token it is 0 (`<unk>`, as SEED-X's sibling tokenizer; padding is on the right and masked).

`train_tiny_tokenizer(out_dir, texts, vocab_size)` trains a Llama-like SentencePiece BPE model
(byte fallback, unk 0 / bos 1 / eos 2) in well under a second and writes a tokenizer directory with
the 66 image tokens: the tokenizer of tests, benchmarks and the demo.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from seed_story_jax.errors import ConversionError

BOI_TOKEN = "<img>"
EOI_TOKEN = "</img>"
NUM_IMG_TOKENS = 64
IMG_TOKENS = tuple(f"<img_{i:05d}>" for i in range(NUM_IMG_TOKENS))
IMAGE_TOKENS = (BOI_TOKEN, EOI_TOKEN) + IMG_TOKENS
SPIECE_UNDERLINE = "\u2581"

_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")


class TokenizerError(ConversionError):
    """A tokenizer directory is wrong; the message names the file."""


@dataclasses.dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = True
    special: bool = False


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from None


def _token_content(v) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class Tokenizer:
    """Llama SentencePiece + added tokens. Construct with `load`, `from_plain` or `train_tiny_tokenizer`."""

    def __init__(self, sp_model_proto: bytes, added: Iterable[AddedToken] = (), *, bos_token: str = "<s>",
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: Optional[str] = None,
                 legacy: bool = True, special_flags: Optional[dict[str, dict]] = None, path: Optional[Path] = None):
        import sentencepiece as spm

        self._proto = bytes(sp_model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.legacy = bool(legacy)
        self.path = path
        self.base_vocab_size = self.sp.get_piece_size()
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self._special_flags = dict(special_flags or {})

        tokens: dict[str, AddedToken] = {}
        by_id: dict[int, str] = {}
        for t in added:
            if t.content in tokens and tokens[t.content].id != t.id:
                raise TokenizerError(f"added token {t.content!r} has two ids ({tokens[t.content].id}, {t.id})")
            if t.id in by_id and by_id[t.id] != t.content:
                raise TokenizerError(f"id {t.id} names two added tokens ({by_id[t.id]!r}, {t.content!r})")
            if t.id < self.base_vocab_size and self.sp.id_to_piece(t.id) != t.content:
                raise TokenizerError(f"added token {t.content!r} has id {t.id}, which is the SentencePiece piece "
                                     f"{self.sp.id_to_piece(t.id)!r}")
            tokens[t.content], by_id[t.id] = t, t.content
        # 4.34 also treats bos/eos/unk/pad as added tokens (split out of text, flags lstrip=rstrip=False)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = getattr(self, name)
            if content is None or content in tokens:
                continue
            tid = self.sp.piece_to_id(content)
            if self.sp.id_to_piece(tid) != content:
                continue  # not a piece (e.g. a pad token the files name but never added)
            f = self._special_flags.get(name, {})
            tokens[content] = AddedToken(content, tid, lstrip=bool(f.get("lstrip", False)),
                                         rstrip=bool(f.get("rstrip", False)), normalized=False, special=True)
            by_id[tid] = content
        self._added = tokens
        self._added_by_id = by_id
        self.vocab_size = max([self.base_vocab_size - 1, *by_id]) + 1
        self._split_re = (re.compile("|".join(re.escape(c) for c in sorted(tokens, key=len, reverse=True)))
                          if tokens else None)
        self._specials = {c for c in (bos_token, eos_token, unk_token, pad_token) if c} | {
            c for c, t in tokens.items() if t.special}
        self._sp_noprefix = None

    # ---------------------------------------------------------------------------------------------
    # ids
    # ---------------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token].id
        tid = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(tid) != token:
            raise KeyError(f"{token!r} is not a token of this tokenizer")
        return tid

    def id_to_token(self, i: int) -> str:
        if i in self._added_by_id:
            return self._added_by_id[i]
        if 0 <= i < self.base_vocab_size:
            return self.sp.id_to_piece(i)
        raise KeyError(f"id {i} is outside the vocabulary (size {self.vocab_size})")

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added token content -> id (ids beyond the SentencePiece vocabulary, plus bos/eos/unk)."""
        return {c: t.id for c, t in self._added.items()}

    @property
    def bos_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def unk_id(self) -> int:
        return self.token_to_id(self.unk_token)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.pad_token) if self.pad_token else 0

    def _image_id(self, token: str) -> int:
        if token not in self._added:
            where = f" ({self.path})" if self.path else ""
            raise TokenizerError(f"tokenizer{where} has no image token {token!r}; build it with "
                                 "Tokenizer.from_plain(dir) or add_image_tokens()")
        return self._added[token].id

    @property
    def has_image_tokens(self) -> bool:
        return all(t in self._added for t in IMAGE_TOKENS)

    @property
    def boi_id(self) -> int:
        return self._image_id(BOI_TOKEN)

    @property
    def eoi_id(self) -> int:
        return self._image_id(EOI_TOKEN)

    @property
    def img_ids(self) -> tuple[int, ...]:
        return tuple(self._image_id(t) for t in IMG_TOKENS)

    def image_token_string(self) -> str:
        """`<img><img_00000>...<img_00063></img>`: one image's 66 tokens as text."""
        return BOI_TOKEN + "".join(IMG_TOKENS) + EOI_TOKEN

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------

    def _noprefix(self):
        """The SentencePiece model without its dummy prefix (4.34's non-legacy processor)."""
        if self._sp_noprefix is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as pb2

            m = pb2.ModelProto.FromString(self._proto)
            m.normalizer_spec.add_dummy_prefix = False
            self._sp_noprefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        return self._sp_noprefix

    def _split(self, text: str) -> list[str]:
        if self._split_re is None:
            return [text]
        parts, pos = [], 0
        for m in self._split_re.finditer(text):
            parts += [text[pos:m.start()], m.group()]
            pos = m.end()
        parts.append(text[pos:])
        # 4.34 splits out empty strings too; they are dropped below, after stripping
        return parts

    def _encode_piece(self, text: str) -> list[str]:
        if self.legacy:
            return self.sp.encode(text, out_type=str)
        sp = self._noprefix()
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return sp.encode(text, out_type=str)
        # the dummy-prefix-free model drops a leading "▁"; 4.34 keeps it by encoding after "<unk>"
        n = len(sp.encode(self.unk_token, out_type=str))
        pieces = sp.encode(self.unk_token + text, out_type=str)
        return pieces[n:] if len(pieces) >= n else pieces

    def tokenize(self, text: str) -> list[str]:
        """Token strings: SentencePiece pieces and added-token contents."""
        if not text:
            return []
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self._split(text)
        is_added = [i % 2 == 1 for i in range(len(parts))]
        for i, part in enumerate(parts):
            if not is_added[i]:
                continue
            tok = self._added[part]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if tok.rstrip and right:
                parts[i + 1] = right.lstrip()
            if tok.lstrip and left:
                parts[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif tok.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        out: list[str] = []
        for part, added in zip(parts, is_added):
            if not part:
                continue
            out += [part] if added and part in self._added else self._encode_piece(part)
        if not self.legacy and len(out) > 1 and out[0] == SPIECE_UNDERLINE and out[1] in self._specials:
            out = out[1:]
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self._added[t].id if t in self._added else self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: runs of SentencePiece ids decoded by SentencePiece, added tokens verbatim.
        Inverse of `encode` for text without runs of whitespace around added tokens."""
        out, run = [], []
        first = True

        def flush():
            nonlocal first
            if run:
                if self.legacy:
                    out.append(self.sp.decode(run))  # every run had its own dummy prefix
                else:
                    s = self._noprefix().decode(run)
                    out.append(s[1:] if first and s.startswith(" ") else s)
                run.clear()
            first = False

        for i in (int(x) for x in ids):
            if i in self._added_by_id and (i >= self.base_vocab_size or self._added_by_id[i] in self._specials):
                content = self._added_by_id[i]
                if skip_special_tokens and content in self._specials:
                    continue
                flush()
                out.append(content)
            else:
                if not 0 <= i < self.base_vocab_size:
                    raise KeyError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
                run.append(i)
        flush()
        return "".join(out)

    # ---------------------------------------------------------------------------------------------
    # files
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer directory (the released layout; see the module docstring for where ids come from)."""
        d = Path(directory)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a tokenizer directory")
        model = d / "tokenizer.model"
        if not model.is_file():
            raise TokenizerError(f"{d}: no tokenizer.model (a SentencePiece model is required)")
        cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        smap = _read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
        specials: dict[str, Optional[str]] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                              "pad_token": None}
        flags: dict[str, dict] = {}
        for name in specials:
            for src in (smap, cfg):  # tokenizer_config.json wins, as in transformers
                if name in src:
                    specials[name] = _token_content(src[name])
                    if isinstance(src[name], dict):
                        flags[name] = src[name]

        sources: dict[str, dict[str, AddedToken]] = {}
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            sources["tokenizer_config.json"] = {
                v["content"]: AddedToken(v["content"], int(k), bool(v.get("lstrip", False)),
                                         bool(v.get("rstrip", False)), bool(v.get("single_word", False)),
                                         bool(v.get("normalized", True)), bool(v.get("special", False)))
                for k, v in cfg["added_tokens_decoder"].items()}
        if (d / "added_tokens.json").is_file():
            data = _read_json(d / "added_tokens.json")
            sources["added_tokens.json"] = {c: AddedToken(c, int(i), lstrip=True, rstrip=True) for c, i in data.items()}
        if (d / "tokenizer.json").is_file():
            data = _read_json(d / "tokenizer.json")
            sources["tokenizer.json"] = {
                t["content"]: AddedToken(t["content"], int(t["id"]), bool(t.get("lstrip", False)),
                                         bool(t.get("rstrip", False)), bool(t.get("single_word", False)),
                                         bool(t.get("normalized", True)), bool(t.get("special", False)))
                for t in data.get("added_tokens", [])}
        seen: dict[str, tuple[int, str]] = {}
        for fname, toks in sources.items():
            for c, t in toks.items():
                if c in seen and seen[c][0] != t.id:
                    raise TokenizerError(f"{d}: {c!r} has id {seen[c][0]} in {seen[c][1]} but {t.id} in {fname}")
                seen.setdefault(c, (t.id, fname))
        # the first source present is the one 4.34 uses (with its flags)
        chosen = next(iter(sources.values()), {})
        legacy = cfg.get("legacy")
        return cls(model.read_bytes(), chosen.values(), legacy=True if legacy is None else bool(legacy),
                   special_flags=flags, path=d, **specials)

    @classmethod
    def from_plain(cls, directory: str | os.PathLike) -> "Tokenizer":
        """A plain Llama tokenizer directory (or one that already has the image tokens) + the 66 image tokens."""
        return cls.load(directory).add_image_tokens()

    def add_image_tokens(self) -> "Tokenizer":
        """A copy with `<img>`, `</img>`, `<img_00000..63>` appended at vocab_size ... vocab_size+65
        (tokens already present keep their ids)."""
        added = [t for t in self._added.values()]
        next_id = self.vocab_size
        for c in IMAGE_TOKENS:
            if c not in self._added:
                added.append(AddedToken(c, next_id))
                next_id += 1
        return self._replace(added)

    def _replace(self, added) -> "Tokenizer":
        return Tokenizer(self._proto, added, bos_token=self.bos_token, eos_token=self.eos_token,
                         unk_token=self.unk_token, pad_token=self.pad_token, legacy=self.legacy,
                         special_flags=self._special_flags, path=self.path)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the released layout (tokenizer.model, added_tokens.json, special_tokens_map.json,
        tokenizer_config.json) atomically. An existing empty directory is fine."""
        from seed_story_jax.atomic import atomic_path

        d = Path(directory)
        empty_dir = d.is_dir() and not any(d.iterdir())
        with atomic_path(d, directory=True, overwrite=overwrite or empty_dir) as tmp:
            self.write_files(tmp)
        self.path = d
        return d

    def write_files(self, d: Path) -> None:
        (d / "tokenizer.model").write_bytes(self._proto)
        beyond = {c: t.id for c, t in sorted(self._added.items(), key=lambda x: x[1].id) if t.id >= self.base_vocab_size}
        (d / "added_tokens.json").write_text(json.dumps(beyond, indent=2) + "\n")

        def special(name):
            content = getattr(self, name)
            if content is None:
                return None
            f = self._special_flags.get(name, {})
            return {"content": content, "lstrip": bool(f.get("lstrip", False)), "normalized": False,
                    "rstrip": bool(f.get("rstrip", False)), "single_word": False}

        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        smap = {n: special(n) for n in names if getattr(self, n) is not None}
        (d / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
        decoder = {str(t.id): {"content": c, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                               "single_word": t.single_word, "special": t.special}
                   for c, t in sorted(self._added.items(), key=lambda x: x[1].id)}
        cfg = {
            "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
            **{n: getattr(self, n) for n in names},
            "clean_up_tokenization_spaces": False, "legacy": self.legacy,
            "model_max_length": 1000000000000000019884624838656, "padding_side": "right",
            "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, base={self.base_vocab_size}, "
                f"added={len(self._added)}, legacy={self.legacy}, path={self.path})")


# -------------------------------------------------------------------------------------------------
# tiny tokenizer for tests, benchmarks and the demo
# -------------------------------------------------------------------------------------------------

_WORDS = (
    "the a an and or but so then when while after before under over into out of on in at to from with "
    "George monkey man yellow hat curious little big red blue green house city park zoo boat kite ball "
    "friend friends happy sad laughs smiles runs jumps climbs looks sees finds takes gives helps plays "
    "says asks wants likes goes comes day night morning sun moon tree trees water window door car train "
    "story picture image frame scene next then finally suddenly together again very too not no yes "
    "he she they it his her their we you I is are was were has have had will can could would"
).split()


def _default_corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        s = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"])
        if i % 7 == 0:
            s = f"[INST] {s} {rng.randint(0, 9999)}"
        out.append(s)
    out += ["Ünïcödé text, emoji 🙂 and 数字 123 are byte-fallback material."]
    return out


def train_tiny_tokenizer(out_dir: str | os.PathLike, texts: Optional[Iterable[str]] = None,
                         vocab_size: int = 512, *, legacy: bool = True, overwrite: bool = False) -> Tokenizer:
    """Train a Llama-like SentencePiece BPE model on `texts` (a built-in story-ish corpus when None),
    add the 66 image tokens and save the directory at `out_dir`. Returns the loaded Tokenizer
    (`tok.path == out_dir`); its `vocab_size` is the SentencePiece size + 66.

    `vocab_size` is the SentencePiece vocabulary (>= 300: 3 specials + 256 byte pieces + characters);
    a corpus too small for that many merges yields fewer pieces rather than failing.
    """
    import sentencepiece as spm

    texts = [t for t in (texts if texts is not None else _default_corpus()) if t]
    if not texts:
        raise ValueError("train_tiny_tokenizer: no texts")
    if vocab_size < 300:
        raise ValueError(f"train_tiny_tokenizer: vocab_size must be >= 300 (byte fallback), got {vocab_size}")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ", hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    tok = Tokenizer(buf.getvalue(), legacy=legacy).add_image_tokens()
    tok.save(out_dir, overwrite=overwrite)
    return tok
