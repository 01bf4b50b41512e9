"""Training data: read rows, recognise their format, turn them into chat messages, and
tokenize them with the model's chat template, labelling only the tokens the loss should see.

Every format becomes a list of {"role", "content"} messages first, so one code path renders
and masks all of them:
- messages:          {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
- alpaca:            {"instruction", "input" (optional), "output", "system" (optional),
                      "history" (optional: [[user, assistant], ...] earlier turns)}
- prompt-completion: {"prompt", "completion"}, both strings or both message lists
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qvera.training.demo import demo_conversations, replay_reply
from qvera.training.recipe import DEMO_DATA, LOCAL_SUFFIXES, DataConfig

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
KEYED_FORMATS = {"alpaca": ("instruction", "output"), "prompt-completion": ("prompt", "completion")}


class DataError(ValueError):
    """A data problem the user must fix; the message names the file and row."""


# ---------------------------------------------------------------- reading rows


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Rows from a local JSON/JSONL/Parquet file or a hub data set (through `datasets`)."""
    local = Path(path)
    if local.suffix in LOCAL_SUFFIXES or local.exists():
        if not local.is_file():
            raise FileNotFoundError(
                f"data file {path} does not exist; pass a .json, .jsonl or .parquet file or a hub data set name"
            )
        if local.suffix == ".jsonl":
            return _read_jsonl(local)
        if local.suffix == ".json":
            return _read_json(local)
        if local.suffix == ".parquet":
            import datasets

            return list(datasets.Dataset.from_parquet(str(local)))
        raise DataError(f"{path}: unsupported file type {local.suffix!r}; use .json, .jsonl or .parquet")
    import datasets

    try:
        return list(datasets.load_dataset(path, split=split))
    except Exception as err:  # datasets raises many types for a name it cannot resolve
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"cannot load data set {path!r} (not a local file, nor a reachable hub data set): {first_line}"
        ) from err


def _read_json(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON (line {err.lineno}: {err.msg}); a .json file holds one list of objects"
        ) from err
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects at the top level, found {type(rows).__name__}")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from err
    return rows


# ---------------------------------------------------------------- formats


def detect_format(row: dict, source: str) -> str:
    """messages, alpaca or prompt-completion, from a row's keys; raises DataError naming the
    row and the missing field when it is none of them."""
    if not isinstance(row, dict):
        raise DataError(f"{source} row 1: expected an object, found {type(row).__name__}")
    if "messages" in row:
        return "messages"
    for fmt, keys in KEYED_FORMATS.items():
        if all(key in row for key in keys):
            return fmt
    for fmt, keys in KEYED_FORMATS.items():
        missing = [key for key in keys if key not in row]
        if len(missing) < len(keys):  # half of a known format: name what the row lacks
            raise DataError(f"{source} row 1: missing {missing[0]!r} ({fmt} rows need {' and '.join(map(repr, keys))})")
    raise DataError(
        f"{source}: unknown data format (first row has keys {sorted(row)}); expected 'messages', "
        "'instruction'+'output' (Alpaca) or 'prompt'+'completion', or set data.format"
    )


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise DataError(f"{where}: missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: {key!r} is blank")
    return value


def _checked_messages(messages, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {key}[{i}] needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {key}[{i}] content must be a string")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """One row as chat messages; `where` ("file row N") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, found {type(row).__name__}")
    if fmt == "messages":
        messages = _checked_messages(row.get("messages"), where)
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        history = row.get("history") or []
        if not isinstance(history, list):
            raise DataError(f"{where}: 'history' must be a list of [user, assistant] pairs")
        for i, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    elif fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            messages = _checked_messages(prompt, where, "prompt") + _checked_messages(completion, where, "completion")
        else:
            messages = [
                {"role": "user", "content": _text(row, "prompt", where)},
                {"role": "assistant", "content": _text(row, "completion", where)},
            ]
    else:
        raise DataError(f"unknown data format {fmt!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no assistant answer to learn from")
    return messages


def conversations(rows: list, fmt: str, source: str) -> list[list[dict]]:
    """Every row as a list of chat messages, validated; `source` names the file in errors."""
    if not rows:
        raise DataError(f"{source} holds no examples; point data.path at a file with at least one row")
    if fmt == "auto":
        fmt = detect_format(rows[0], source)
    return [to_messages(row, fmt, f"{source} row {n}") for n, row in enumerate(rows, start=1)]


def load_conversations(config: DataConfig, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, eval) conversations, validated; no tokenizer needed, so bad data fails in seconds."""
    if config.path == DEMO_DATA:
        train = demo_conversations()
    else:
        train = conversations(read_rows(config.path, config.split), config.format, config.path)
    if config.max_examples:
        train = train[: config.max_examples]
    if config.eval_path:
        return train, conversations(read_rows(config.eval_path, config.split), config.format, config.eval_path)
    held_out = round(len(train) * config.eval_fraction)
    if held_out == 0:
        return train, []
    if held_out >= len(train):
        raise DataError(
            f"{config.path}: {len(train)} example(s) leave nothing to train "
            f"on after holding out eval_fraction={config.eval_fraction}"
        )
    return split_held_out(train, held_out, seed)


def replay_shape(config: DataConfig):
    """How replayed answers are taught for this data (see qvera.training.replay): the demo
    teaches a format, so the base's replies go inside its JSON; other data keeps each reply as
    the base gave it (None)."""
    return replay_reply if config.path == DEMO_DATA else None


def split_held_out(convs: list, held_out: int, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): a fixed random split, both in the data's own order, so every run in a
    comparison sees the same rows."""
    if not 0 < held_out < len(convs):
        raise ValueError(f"held_out must be between 1 and {len(convs) - 1} for {len(convs)} examples, got {held_out}")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_out])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in sorted(held)]


# ---------------------------------------------------------------- tokenizing


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, messages: list[dict], assistant_only_loss: bool = True) -> dict:
    """input_ids and labels; labels are -100 outside assistant turns when `assistant_only_loss`.

    Assistant spans are found on the rendered text: the prompt prefix (history plus the
    generation prompt) ends where the answer starts, and the conversation up to that answer
    ends where it ends, end-of-turn token included, so the model learns to stop.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1]))
        if not text.startswith(render(tokenizer, messages[: i + 1])):
            raise DataError(
                "the model's chat template renders a conversation differently "
                "from its prefixes; set data.assistant_only_loss: false"
            )
        spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    offsets = list(encoded["offset_mapping"])
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not input_ids or input_ids[0] != bos):
        input_ids, offsets = [bos] + input_ids, [(0, 0)] + offsets
    if not assistant_only_loss:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
        for token, (begin, _end) in zip(input_ids, offsets)
    ]
    return {"input_ids": input_ids, "labels": labels}


def tokenized_dataset(tokenizer, convs: list[list[dict]], assistant_only_loss: bool = True):
    """A datasets.Dataset of input_ids and labels (non-assistant tokens masked unless
    `assistant_only_loss` is False), what SFTTrainer takes as already tokenized."""
    import datasets

    rows = [tokenize_conversation(tokenizer, messages, assistant_only_loss) for messages in convs]
    return datasets.Dataset.from_list(rows)
