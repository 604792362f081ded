"""User data files: detect the row shape from the first row, then turn rows into examples.

Shapes (the first row's keys decide, for the whole file):
  prompt/completion  {"prompt", "completion"}             used as-is, exact match
  chat               {"messages": [{role, content}, ...]}  last message = the assistant target
  labelled           {"text" | "sentence", "label"}       choices = the file's distinct labels
  multiple choice    {"question", "choices", "answer"}     answer = index or the choice text

Chat rows always go through the tokenizer's chat template (they are a conversation), whatever
`chat` says; labelled and multiple-choice rows use it only when `chat` is on and one exists.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from lorafleet.data.examples import ACCURACY, EXACT_MATCH, DataError, Example, ExampleSet
from lorafleet.data.prompts import (
    CHOICE_CHAT,
    CHOICE_PLAIN,
    LABELLED_CHAT,
    LABELLED_PLAIN,
    Prompter,
    has_chat_template,
    option_lines,
    render_chat,
)
from lorafleet.data.readers import iter_rows

ROLES = ("system", "user", "assistant")
_INT = re.compile(r"-?\d+")


def detect_shape(row: dict, where: str) -> str:
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if keys & {"prompt", "completion"}:
        return "completion"
    if "choices" in keys:
        return "choice"
    if keys & {"text", "sentence", "label"}:
        return "labelled"
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise DataError(
        f"{where}: cannot tell the row shape from its fields ({found}); expected "
        "prompt/completion, messages, text/label or question/choices/answer"
    )


def field(row: dict, key: str, where: str, kind: type | tuple = str, alias: str = "") -> Any:
    """row[key] (or row[alias]), checked against `kind`; bools never pass as ints."""
    value = row.get(key)
    if value is None and alias:
        value = row.get(alias)
    if value is None:
        raise DataError(f'{where}: missing field "{key}"')
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f'{where}: field "{key}" must be {names}, found {type(value).__name__}')
    return value


def load_file(path: Path, tokenizer: Any, *, chat: bool, limit: int | None) -> ExampleSet:
    """Read a user data file into an ExampleSet (the first `limit` rows when given)."""
    rows = iter_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: no usable rows (empty file)")
    shape = detect_shape(first[1], first[0])
    rows = itertools.chain([first], rows)
    prompter = Prompter.for_tokenizer(tokenizer, chat)
    if shape == "labelled":
        # Choices come from the whole file, so every label is read (cheap: no templating).
        return _labelled(path, list(rows), prompter, limit)
    head = itertools.islice(rows, limit)
    if shape == "completion":
        examples = [_completion(where, row) for where, row in head]
        return ExampleSet(examples, path.name, EXACT_MATCH)
    if shape == "chat":
        if not has_chat_template(tokenizer):
            raise DataError(
                f'{path}: chat rows ("messages") need a tokenizer with a chat template, '
                "and this tokenizer has none; use prompt/completion rows instead"
            )
        examples = [_chat(where, row, tokenizer) for where, row in head]
        return ExampleSet(examples, path.name, EXACT_MATCH)
    examples = [_choice(where, row, prompter) for where, row in head]
    return ExampleSet(examples, path.name, ACCURACY)


def _completion(where: str, row: dict) -> Example:
    prompt = field(row, "prompt", where)
    completion = field(row, "completion", where)
    return Example(prompt=prompt, target=completion, source=where)


def _chat(where: str, row: dict, tokenizer: Any) -> Example:
    messages = field(row, "messages", where, list)
    if not messages:
        raise DataError(f'{where}: field "messages" is empty')
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f'{where}: message {i} needs "content" as a string')
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "assistant":
        raise DataError(
            f'{where}: the last message must be from "assistant" (the target), '
            f'found "{clean[-1]["role"]}"'
        )
    prompt = render_chat(tokenizer, clean[:-1], where)
    return Example(prompt=prompt, target=clean[-1]["content"], source=where)


def _label_key(where: str, row: dict) -> str:
    value = field(row, "label", where, (int, str))
    key = str(value).strip()
    if not key:
        raise DataError(f'{where}: field "label" is empty')
    return key


def sorted_labels(keys: set[str]) -> tuple[str, ...]:
    """Integer labels sort numerically (2 before 10); anything else sorts as text."""
    if all(_INT.fullmatch(k) for k in keys):
        return tuple(sorted(keys, key=lambda k: (int(k), k)))
    return tuple(sorted(keys))


def _labelled(path: Path, rows: list, prompter: Prompter, limit: int | None) -> ExampleSet:
    keys = [_label_key(where, row) for where, row in rows]
    names = sorted_labels(set(keys))
    index = {name: i for i, name in enumerate(names)}
    choices = tuple(prompter.answer(name) for name in names)
    options = ", ".join(names)
    examples = []
    for (where, row), key in itertools.islice(zip(rows, keys, strict=True), limit):
        text = field(row, "text", where, alias="sentence")
        prompt = prompter.prompt(
            LABELLED_CHAT.format(text=text, options=options),
            LABELLED_PLAIN.format(text=text),
            where,
        )
        label = index[key]
        examples.append(Example(prompt, choices[label], choices, label, where))
    return ExampleSet(examples, path.name, ACCURACY)


def _answer_index(answer: int | str, texts: list[str], where: str) -> int:
    if isinstance(answer, str):
        if answer in texts:
            return texts.index(answer)
        if not _INT.fullmatch(answer.strip()):
            raise DataError(f'{where}: answer "{answer}" is not one of the choices')
        answer = int(answer)  # CSV cells are text: "2" means index 2
    if not 0 <= answer < len(texts):
        raise DataError(f"{where}: answer {answer} out of range (0..{len(texts) - 1})")
    return answer


def _choice(where: str, row: dict, prompter: Prompter) -> Example:
    question = field(row, "question", where)
    texts = field(row, "choices", where, list)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(f'{where}: field "choices" must be a non-empty list of strings')
    label = _answer_index(field(row, "answer", where, (int, str)), texts, where)
    options = option_lines(texts)
    prompt = prompter.prompt(
        CHOICE_CHAT.format(question=question, options=options),
        CHOICE_PLAIN.format(question=question, options=options),
        where,
    )
    choices = tuple(prompter.answer(t) for t in texts)
    return Example(prompt, choices[label], choices, label, where)
