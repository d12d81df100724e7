"""Token counts with a local model's own tokenizer and chat template, at data-tool speed.

``stats`` counts what the local trainer will see: the whole rendered conversation and the
assistant tokens that carry the loss (each answer and its end-of-turn token, ``chat_data``).
Rendering and tokenising every example through transformers costs about 25 times the OpenAI
count, so this reads the model's ``tokenizer.json`` with the ``tokenizers`` library (no
transformers import: a fraction of the memory) and its chat template with jinja2, and:

- renders the template once per message shape (the roles in order) with empty contents, which
  gives the template's own tokens for that shape;
- counts the contents of a whole block of examples through a cache of token counts per piece
  (below), encoding only the pieces it has not seen, in batches;
- adds them up. That equals tokenising the rendered text wherever the template inserts each
  content verbatim between tokens that never merge with it: checked once per shape (rendering
  with two different probe contents must add exactly their tokens), and an example with content
  that starts or ends with whitespace (which may merge with the template's newlines) is rendered
  and encoded whole instead (its total exact; its trained tokens counted per answer).

Runs inside the block-parallel pass of ``analysis`` (forked workers share the tokenizer).

Why a count cache rather than only the library's batch encoder: byte-level BPE in ``tokenizers``
runs at a tenth of the OpenAI counter's rate, which made default ``stats`` several times slower
than ``--no-local`` (bench/README.md, "`stats` with the local model's token counts"). A byte-level BPE tokenizer with the GPT-2
pre-tokenizer (SmolLM2's, and most byte-level models') never merges across a point where
whitespace follows a non-whitespace character: every pattern of its pre-tokenizer regex either
stops before whitespace or starts with it. So a text splits at those points into pieces (a run
of whitespace and the word after it, such as " world."), its token count is the sum of its
pieces' counts, and each piece is encoded alone exactly as in the text. Chat data repeats its
pieces heavily, so most are counted by one dict lookup. The cache is used only for tokenizers
whose ``tokenizer.json`` has no normalizer and that pre-tokenizer (anything else is encoded
whole), a text holding an added token that contains whitespace or strips it is encoded whole,
and the cache is bounded (it stops taking new pieces when full) so memory stays flat.
"""

from __future__ import annotations

import itertools
import json
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .messages import content_text, text_messages

_PROBES = ("alpha", "beta gamma")
# Unicode White_Space, which is what the tokenizer's regex means by \s (Python's \s also takes
# the control characters \x1c-\x1f, which the tokenizer treats as punctuation)
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PIECES = re.compile(f"[{_WS}]*[^{_WS}]+|[{_WS}]+")
_DIGIT_SET = frozenset("0123456789")
_TO_ZERO = str.maketrans("123456789", "000000000")
SHORT_TEXT = 80  # texts up to this length are also cached whole
CACHE_MAX = 100_000  # pieces per process (about 10 MB); when full, no new piece is kept


def piece_cache_applies(config: dict[str, Any]) -> bool:
    """Whether counting by pieces is exact for this ``tokenizer.json`` (see the module's doc)."""
    if config.get("normalizer") is not None:
        return False
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel":
        return False
    last = steps[-1]
    if not last.get("use_regex", True) or last.get("add_prefix_space"):
        return False
    # digits split one by one before the byte-level regex stay within a piece
    return all(s.get("type") == "Digits" for s in steps[:-1])


@dataclass
class LocalCounts:
    tokens: array = field(default_factory=lambda: array("i"))  # per example
    assistant: int = 0  # tokens carrying the loss
    fixed: array = field(default_factory=lambda: array("i"))  # per example: tokens outside user messages


def digits_are_single_tokens(config: dict[str, Any]) -> bool:
    """Whether the vocabulary holds the ten digits as tokens and no other token with a digit."""
    vocab = (config.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        return False
    return sorted(k for k in vocab if not _DIGIT_SET.isdisjoint(k)) == list("0123456789")


class _Counts(dict[str, int]):
    """Token counts by piece; a missing piece counts 0 and is noted with the text it is in
    (``at``), so that a block's lookups run at C speed and its new pieces are encoded at once.
    With ``fold`` (digits to 0), a missing piece with digits counts as its folded form, which
    alone is kept: a new issue number is a lookup, not a new entry."""

    at = 0
    fold: dict[int, int] | None = None
    missed: list[tuple[int, str]]

    def __missing__(self, key: str) -> int:
        if self.fold is not None:
            folded = key.translate(self.fold)
            if folded != key:
                n = self.get(folded)
                if n is not None:
                    return n
                key = folded
        self.missed.append((self.at, key))
        return 0


ACTIVE: LocalCounter | None = None  # set by analysis before it forks its workers, which inherit it


class LocalCounter:
    def __init__(self, tokenizer_dir: str | Path, model: str) -> None:
        import jinja2
        from tokenizers import Tokenizer

        d = Path(tokenizer_dir)
        self.model = model
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        spec = _tokenizer_spec(self.tokenizer)  # the parts used here, without parsing the 3 MB file again
        exact = piece_cache_applies(spec)
        self._cache: _Counts | None = _Counts() if exact else None  # piece -> tokens
        self._spaced: _Counts | None = _Counts() if exact else None  # word -> tokens of " " + word
        self._texts: dict[str, int] | None = {} if exact else None  # short text -> tokens
        risky = [
            t.content
            for t in self.tokenizer.get_added_tokens_decoder().values()
            if t.lstrip or t.rstrip or _PIECES.fullmatch(t.content) is None
        ]  # an added token that is not one piece could straddle two; such texts are encoded whole
        self._risky = re.compile("|".join(map(re.escape, risky))) if risky else None
        # where every ASCII digit is a token of its own and no other token holds one (SmolLM2's
        # vocabulary), no merge involves a digit, so a text counts as many tokens with every
        # digit made 0: issue numbers, versions and times then hit the cache instead of each
        # being a new piece to encode
        self._digits = _TO_ZERO if digits_are_single_tokens(spec) else None
        if self._cache is not None and self._spaced is not None:
            self._cache.fold = self._spaced.fold = self._digits
        del spec
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if not template and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str) or not template:
            raise ValueError(f"{d} has no chat template")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_tokens = len(self._encode(self.special.get("eos_token") or ""))
        self._shapes: dict[tuple[str, ...], int | None] = {}

    def _lengths(self, texts: list[str]) -> list[int]:
        """Token counts of many texts: by pieces through the caches where that is exact, else by
        the tokenizer's batch encoder.

        A short text seen before (a system prompt, a label) is one lookup in ``_texts``. A text
        whose only whitespace is single ASCII spaces between words (most prompts) is split with
        ``str.split(" ")``, several times faster than the regex: its pieces are its first word
        and " " + each later word, counted through ``_spaced`` (word -> tokens of " " + word) so
        that no string is built per word. A piece not in a cache counts 0 at first and is noted;
        the block's new pieces are then encoded in one batch and their counts added."""
        cache, spaced, known = self._cache, self._spaced, self._texts
        if cache is None or spaced is None or known is None:
            return self._encoded_lengths(texts)
        risky = self._risky
        out = [0] * len(texts)
        whole: list[int] = []  # encoded whole
        cache.missed, spaced.missed = [], []
        get, sget, islice = cache.__getitem__, spaced.__getitem__, itertools.islice
        for i, t in enumerate(texts):
            n = known.get(t)
            if n is not None:
                out[i] = n
                continue
            cache.at = spaced.at = i
            if risky is not None and risky.search(t):
                whole.append(i)
                continue
            if t and t.isprintable() and "  " not in t and t[0] != " " and t[-1] != " ":
                words = t.split(" ")
                out[i] = get(words[0]) + sum(map(sget, islice(words, 1, None)))
            else:
                out[i] = sum(map(get, _PIECES.findall(t)))
        for counts, prefix in ((cache, ""), (spaced, " ")):
            new = list({k for _, k in counts.missed})
            fresh = dict(zip(new, self._encoded_lengths([prefix + k for k in new])))
            for i, k in counts.missed:
                out[i] += fresh[k]
            counts.missed = []
            if len(cache) + len(spaced) + len(known) < CACHE_MAX:
                # when full, new pieces are not kept: clearing instead would throw away the
                # frequent pieces, learnt first, where every example has a unique piece (an
                # issue number), and encode them again and again
                counts.update(fresh)
        for i, n in zip(whole, self._encoded_lengths([texts[i] for i in whole])):
            out[i] = n
        if len(cache) + len(spaced) + len(known) < CACHE_MAX:
            for i, t in enumerate(texts):
                if len(t) <= SHORT_TEXT:
                    known[t] = out[i]
        return out

    def _encoded_lengths(self, texts: list[str]) -> list[int]:
        """Batch encoding without offsets where the library has it, in slices, so that a block
        never holds thousands of Encoding objects at once."""
        encode = getattr(self.tokenizer, "encode_batch_fast", None) or self.tokenizer.encode_batch
        out: list[int] = []
        for k in range(0, len(texts), 256):
            out.extend(len(e.ids) for e in encode(texts[k : k + 256], add_special_tokens=False))
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return str(self.template.render(messages=messages, add_generation_prompt=False, **self.special))

    def _overhead(self, roles: tuple[str, ...]) -> int | None:
        """The template's own tokens for this shape, or None if contents are not added verbatim."""
        if roles not in self._shapes:
            empty = len(self._encode(self._render([{"role": r, "content": ""} for r in roles])))
            ok = True
            for probe in _PROBES:
                rendered = self._render([{"role": r, "content": probe} for r in roles])
                ok = ok and len(self._encode(rendered)) == empty + len(roles) * len(self._encode(probe))
            self._shapes[roles] = empty if ok else None
        return self._shapes[roles]

    def count_block(self, examples: list[list[dict[str, Any]]]) -> LocalCounts:
        out = LocalCounts()
        contents: list[str] = []
        starts: list[int] = []  # where an example's contents start in ``contents``; -1: slow path
        overheads: list[int] = []
        shapes, overhead_of = self._shapes, self._overhead
        for messages in examples:
            texts = [
                m.get("content") or "" if isinstance(m.get("content"), str) else content_text(m.get("content"))
                for m in messages
            ]
            roles = tuple([str(m.get("role")) for m in messages])
            overhead = shapes[roles] if roles in shapes else overhead_of(roles)
            # str.strip returns the string itself when there is nothing to strip: no copy
            if overhead is None or not all([isinstance(t, str) and t == t.strip() for t in texts]):
                starts.append(-1)
                overheads.append(0)
                continue
            starts.append(len(contents))
            overheads.append(overhead)
            contents.extend(texts)
        lengths = self._lengths(contents)
        eos = self.eos_tokens
        for messages, start, total in zip(examples, starts, overheads):
            if start < 0:
                total, trained, user = self._slow(messages)
            else:
                trained = user = 0
                for m, n in zip(messages, lengths[start : start + len(messages)]):
                    total += n
                    role = m.get("role")
                    if role == "user":
                        user += n
                    elif role == "assistant" and m.get("weight", 1) != 0:
                        trained += n + eos
            out.tokens.append(total)
            out.assistant += trained
            out.fixed.append(total - user)
        return out

    def _slow(self, messages: list[dict[str, Any]]) -> tuple[int, int, int]:
        messages = text_messages(messages)
        clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        total = len(self._encode(self._render(clean)))
        trained = sum(
            len(self._encode(str(m.get("content") or ""))) + self.eos_tokens
            for m in messages
            if m.get("role") == "assistant" and m.get("weight", 1) != 0
        )
        user = sum(len(self._encode(str(m.get("content") or ""))) for m in messages if m.get("role") == "user")
        return total, trained, user


def _tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """What ``piece_cache_applies`` and ``digits_are_single_tokens`` read, as in tokenizer.json."""
    normalizer = tokenizer.normalizer
    pre = tokenizer.pre_tokenizer
    return {
        "normalizer": None if normalizer is None else json.loads(normalizer.__getstate__()),
        "pre_tokenizer": None if pre is None else json.loads(pre.__getstate__()),
        "model": {"vocab": tokenizer.get_vocab()},
    }


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise ValueError(message)
