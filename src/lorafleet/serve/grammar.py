"""Structured output: JSON grammars (xgrammar) compiled for the base's tokenizer and cached by
schema, one matcher per constrained row, and their token masks applied to those rows' logits.

xgrammar is an optional dependency (`pip install 'lorafleet[structured]'`): it is imported only
when a request asks for structured output, and its absence is a one-line error naming what to
install (`GrammarUnavailable`). Why xgrammar: BENCHMARKS.md, "Structured output"."""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.errors import LorafleetError

INSTALL = "pip install 'lorafleet[structured]' (or: pip install xgrammar)"
KINDS = ("json_schema", "json_object")
# Keywords that constrain values but that the grammar engine does not enforce: a schema using
# them is refused (400) rather than answered with JSON that may not validate against it.
UNENFORCED = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
)
# Where a schema holds sub-schemas: keyword -> how (one schema, a list, or a name -> schema map).
SUBSCHEMAS = {
    "items": "one",
    "additionalProperties": "one",
    "additionalItems": "one",
    "unevaluatedProperties": "one",
    "prefixItems": "list",
    "anyOf": "list",
    "oneOf": "list",
    "allOf": "list",
    "properties": "map",
    "patternProperties": "map",
    "$defs": "map",
    "definitions": "map",
}
# The engine's messages start with "[time] /path/file.cc:line: "; users need only the rest.
ENGINE_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
# Bitmasks live on the CPU: the grammar engine (xgrammar) fills CPU int32 tensors; a step
# moves them to the logits' device once (apply_masks). Made there explicitly, never on torch's
# default device.
HOST = torch.device("cpu")
# Byte b of a bitmask -> the 8 tokens it covers: 0 where allowed, -inf where not.
_BYTE_MASK = torch.where(
    ((torch.arange(256, device=HOST)[:, None] >> torch.arange(8, device=HOST)) & 1).bool(),
    0.0,
    float("-inf"),
)  # [256, 8] float32


class GrammarError(LorafleetError):
    """A response format the grammar engine cannot serve (a bad or unsupported schema)."""


class GrammarUnavailable(LorafleetError):
    """Structured output was asked for, but the grammar engine (xgrammar) is not installed."""


def unavailable() -> str | None:
    """Why structured output cannot run here (one line naming what to install), or None."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return f"structured output (response_format, tools) needs xgrammar: {INSTALL}"
    return None


def _xgrammar():
    problem = unavailable()
    if problem:
        raise GrammarUnavailable(problem)
    import xgrammar

    return xgrammar


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained row must produce; plain data (hashable: the compile cache's key).

    kind "json_schema": one JSON value valid against `schema` (its JSON text, key order kept:
    properties come out in the schema's order). Properties the schema does not name are never
    generated, and no whitespace is added beyond ", " and ": " (a model cannot run on in
    spaces). kind "json_object": any JSON object (`schema` None)."""

    kind: str
    schema: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"a grammar's kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "json_schema") != isinstance(self.schema, str):
            raise GrammarError("a json_schema grammar needs its schema as JSON text (only it)")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> GrammarSpec:
        """A schema (dict, bool or its JSON text): checked for keywords the engine would not
        enforce; a GrammarError (one line, naming the keyword and where) otherwise."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        check_keywords(schema)
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    def check(self) -> None:
        """Parse the schema as the engine will (no tokenizer needed, a few ms): GrammarError
        naming the problem, or GrammarUnavailable without xgrammar."""
        xgr = _xgrammar()
        if self.kind == "json_object":
            return
        try:
            xgr.Grammar.from_json_schema(self.schema, **_options(self))
        except Exception as exc:  # the engine raises RuntimeError / ValueError with a reason
            raise GrammarError(f"unsupported JSON schema: {engine_message(exc)}") from None


def _options(spec: GrammarSpec) -> dict:
    return {"any_whitespace": False, "strict_mode": spec.kind == "json_schema"}


def engine_message(exc: BaseException) -> str:
    """The engine's error as one line, without its source-file prefix."""
    text = ENGINE_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return text or type(exc).__name__


def check_keywords(schema, where: str = "") -> None:
    """Raise a GrammarError for the first construct in `schema` or its sub-schemas that the
    engine would not enforce (measured: it would generate JSON that does not validate): a
    keyword in UNENFORCED, `uniqueItems: true`, `allOf` of several schemas, a `required`
    property missing from `properties` (no other property is ever generated), and `format`
    beside a string's length or pattern (the format wins). `where` names the path."""
    if not isinstance(schema, dict):
        return
    at = f" (at {where})" if where else ""
    for key in UNENFORCED:
        if key in schema:
            raise GrammarError(_refusal(key, where))
    if schema.get("uniqueItems") is True:
        raise GrammarError(_refusal("uniqueItems", where))
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise GrammarError(f"'allOf' of more than one schema{at} is not supported")
    named = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    missing = [name for name in required if name not in named]
    if missing:
        raise GrammarError(f"required property {missing[0]!r}{at} is not in 'properties'")
    if "format" in schema and {"minLength", "maxLength", "pattern"} & set(schema):
        raise GrammarError(f"'format' beside minLength/maxLength/pattern{at} is not supported")
    for key, how in SUBSCHEMAS.items():
        value = schema.get(key)
        if how == "one":
            check_keywords(value, f"{where}.{key}" if where else key)
        elif how == "list" and isinstance(value, list):
            for i, sub in enumerate(value):
                check_keywords(sub, f"{where}.{key}[{i}]" if where else f"{key}[{i}]")
        elif how == "map" and isinstance(value, dict):
            for name, sub in value.items():
                check_keywords(sub, f"{where}.{key}.{name}" if where else f"{key}.{name}")


def _refusal(key: str, where: str) -> str:
    at = f" (at {where})" if where else ""
    return f"the JSON schema keyword {key!r}{at} is not supported by structured output"


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """A bool [V] as a bitmask int32 [ceil(V / 32)]: bit t % 32 of word t // 32 = allowed[t]."""
    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64, device=allowed.device)
    bits[: allowed.numel()] = allowed.long()
    shifts = torch.arange(32, device=allowed.device)
    packed = (bits.view(words, 32) << shifts).sum(dim=1)  # [W], 0 .. 2**32 - 1
    return (packed - (packed >= 2**31).long() * 2**32).to(torch.int32)  # two's complement


def keep_mask(decoded_vocab: Sequence[bytes], special: set[int], vocab_size: int) -> torch.Tensor:
    """The tokens a JSON document may use: every one but those holding a control byte (below
    0x20). JSON forbids those raw inside strings, and with no whitespace beyond spaces none is
    needed outside; the grammar engine's string rule lets some through, so they are masked
    here. Special tokens (EOS) stay. int32 bitmask [ceil(vocab_size / 32)]."""
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=HOST)
    for i, token in enumerate(decoded_vocab[:vocab_size]):
        if i not in special and any(b < 0x20 for b in token):
            allowed[i] = False
    return pack_bits(allowed)


class Matcher:
    """One row's grammar state: which tokens may come next, and whether the document is done.

    `stop_ids` are the tokens that end a complete document (the model's EOS); `keep` (int32
    [ceil(V / 32)]) the tokens a document may use at all (keep_mask)."""

    def __init__(self, matcher, stop_ids: Sequence[int], vocab_size: int, keep: torch.Tensor):
        self._m, self.stop_ids, self.vocab_size = matcher, tuple(stop_ids), vocab_size
        self.keep = keep

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [n, ceil(V / 32)], bit t % 32
        of word t // 32 set = token t allowed)."""
        self._m.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.keep

    def advance(self, token: int) -> bool:
        """Accept `token`; True when the document is complete with it: a stop token was
        accepted, or nothing but a stop token may follow (e.g. after the closing brace). A
        GrammarError when the grammar refuses the token (a row whose schema left no choice)."""
        if not self._m.accept_token(token):
            raise GrammarError(
                "the response format allows no next token here (the schema admits no value)"
            )
        if self._m.is_terminated():
            return True
        return self._m.is_completed() and not self._more_than_stop()

    def _more_than_stop(self) -> bool:
        mask = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32, device=HOST)
        self.fill(mask, 0)
        allowed = _BYTE_MASK[mask.view(torch.uint8).long()].view(-1)[: self.vocab_size] == 0
        allowed[[t for t in self.stop_ids if 0 <= t < self.vocab_size]] = False  # [V] bool
        return bool(allowed.any())


# tokenizer -> {(vocab size, stop ids): (the engine's TokenizerInfo, keep_mask)}: engines on
# one tokenizer (tests, benchmarks, replicas in a process) process it once.
_INFOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INFOS_LOCK = threading.Lock()


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    """The grammar engine's view of `tokenizer` and its keep_mask, made once per tokenizer."""
    with _INFOS_LOCK:
        made = _INFOS.setdefault(tokenizer, {})
        key = (vocab_size, stop_ids)
        if key not in made:
            info = _xgrammar().TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
            )
            special = {*info.special_token_ids, *stop_ids}
            made[key] = (info, keep_mask(info.decoded_vocab, special, vocab_size))
        return made[key]


class GrammarCache:
    """Grammars compiled for one tokenizer and vocabulary, the last `size` specs kept (LRU).

    The tokenizer's processing for the engine (~0.5 s for a 49k vocabulary) happens on the
    first constrained request, never for servers that get none. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int], size: int = 256):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, tuple(stop_ids)
        self.size = size
        self._compiler = None
        self._keep: torch.Tensor | None = None
        self._compiled: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (misses); tests and stats read it

    def _get_compiler(self):
        if self._compiler is None:
            info, self._keep = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_ids)
            self._compiler = _xgrammar().GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compiled(self, spec: GrammarSpec):
        """The compiled grammar of `spec` (cached); GrammarError / GrammarUnavailable."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
            compiler = self._get_compiler()
            schema = spec.schema if spec.kind == "json_schema" else '{"type":"object"}'
            try:
                grammar = compiler.compile_json_schema(schema, **_options(spec))
            except Exception as exc:
                raise GrammarError(f"unsupported JSON schema: {engine_message(exc)}") from None
            self.compiles += 1
            self._compiled[spec] = grammar
            while len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
            return grammar

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for one row."""
        xgr = _xgrammar()
        compiled = self.compiled(spec)
        return Matcher(xgr.GrammarMatcher(compiled), self.stop_ids, self.vocab_size, self._keep)


def fill_masks(matchers: Sequence[Matcher], failed: dict[int, str] | None = None) -> torch.Tensor:
    """Each matcher's allowed next tokens: int32 [n, ceil(V / 32)] on the CPU, V being the
    matchers' vocabulary size (one engine's matchers share it).

    A matcher that raises (the grammar engine's own failure): with `failed`, its row allows
    every token and failed[row] is the error as one line (the caller fails that row alone);
    without, the error propagates."""
    vocab_size = matchers[0].vocab_size
    bitmask = torch.empty((len(matchers), (vocab_size + 31) // 32), dtype=torch.int32, device=HOST)
    for row, matcher in enumerate(matchers):
        try:
            matcher.fill(bitmask, row)
        except Exception as exc:
            if failed is None:
                raise
            bitmask[row] = -1  # every bit set: the row is failed, its mask must not matter
            failed[row] = f"{type(exc).__name__}: {engine_message(exc)}"
    return bitmask


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the disallowed tokens of each row to -inf, in place. logits: [n, V] float (any
    device); bitmask: int32 [n, W] (fill_masks; tokens past 32 * W are disallowed, e.g. the
    padding rows of an embedding larger than the tokenizer). A row that allows no token at all
    is left as it is: its sampled token is then refused by its matcher, which fails that row
    alone (an all -inf row would break sampling for the whole batch)."""
    alive = bitmask.ne(0).any(dim=1)  # [n]
    if not bool(alive.all()):
        rows = alive.nonzero()[:, 0]
        if rows.numel():
            sub = logits.index_select(0, rows.to(logits.device))
            apply_masks(sub, bitmask.index_select(0, rows))
            logits.index_copy_(0, rows.to(logits.device), sub)
        return
    n, vocab = logits.shape
    table = _BYTE_MASK.to(device=logits.device, dtype=logits.dtype)
    # int32 words viewed as little-endian bytes: byte k of word w covers tokens 32w + 8k + 0..7.
    index = bitmask.to(logits.device, non_blocking=True).view(torch.uint8).long()  # [n, 4W]
    add = table[index].view(n, -1)  # [n, 32W]
    covered = min(vocab, add.shape[1])
    logits[:, :covered].add_(add[:, :covered])
    logits[:, covered:] = float("-inf")
