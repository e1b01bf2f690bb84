"""What a run never records: credentials. Every record writer goes through `scrub` (run_info.json, summary.json,
metrics.jsonl and the tables, every tracking sink's config, tags, names and summaries, Hydra's `.hydra/` record, a
sweep's job files and table, checkpoints' config, the console), so a secret that reached a config value, a tag, an
error message or a dataset row is written as `<redacted>`.

The rule, in order:
1. A value under a key *named* like a secret is redacted whatever it is: the key's last words are `token`,
   `secret`, `password`/`passwd`/`passphrase`, `credential(s)`, `auth`/`authorization`, `cookie`, or
   `api key` / `access key` / `private key` / `secret key` / `client secret` (`HF_TOKEN`, `logger.api_key`,
   `aws_secret_access_key`); a tokenizer's special tokens (`eos_token`, `pad_token`, ...) and plurals
   (`max_new_tokens`) are not secrets. In text the same names are recognised in `name=value` and `name: value`.
2. The value of every environment variable named like a secret (HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD,
   ...; 8 characters or more) is redacted wherever it appears, in any key or text.
3. Strings shaped like a credential are redacted wherever they appear: Hugging Face (`hf_...`), GitHub
   (`ghp_...`, `github_pat_...`), GitLab (`glpat-...`), OpenAI/Anthropic-style (`sk-...`), AWS access key ids
   (`AKIA...`), Slack (`xox?-...`), JSON web tokens, PEM private keys, `Bearer ...`, and the `user:password@` of
   a URL.

No config key of the schema is named like a secret (tests/test_trust.py checks), so rule 1 never hides a setting.
What this cannot know: a credential in no known shape, under an ordinary name, that is not in the environment.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

REDACTED = "<redacted>"
MIN_SECRET = 8  # shorter environment values (a "1", a path component) would redact unrelated text

# (not `pwd`: the shell's PWD is the working directory)
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "auth",
                 "authorization", "cookie", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret")}
_SPECIAL_TOKENS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask"}  # a tokenizer's, not a credential


def secret_name(name: str) -> bool:
    """Whether a key or variable is named like a secret (rule 1): its last word, or its last two."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()) if w]
    if not words:
        return False
    if words[-1] == "token" and len(words) > 1 and words[-2] in _SPECIAL_TOKENS:
        return False
    return words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS


_SHAPES = re.compile("|".join([
    r"\bhf_[A-Za-z0-9]{30,}",
    r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}", r"\bgithub_pat_[A-Za-z0-9_]{40,}",
    r"\bglpat-[A-Za-z0-9_-]{20,}",
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
]))
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{8,}=*")
_URL_USER = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@'\"]+:[^/\s@'\"]+@")
# name=value, name: value, "name": "value": each name is found without consuming what follows it, so a name inside
# another's value (`override_dirname: +model.token=x`) is found too; its value is redacted when secret_name says so
_NAME = re.compile(r"(?<![\w.\-/])([A-Za-z_][\w.\-/]*)[\"']?[ \t]*[=:][ \t]*")
_VALUE = re.compile(r"([\"']?)([^\s\"',}\]\)]+)")


@functools.lru_cache(maxsize=8)
def _env_pattern(values: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))) if values else None


def env_secrets() -> tuple[str, ...]:
    """The values of this process's environment variables named like secrets (rule 2)."""
    return tuple(sorted({v for k, v in os.environ.items() if len(v) >= MIN_SECRET and secret_name(k)}))


def scrub_text(text: str) -> str:
    """`text` with every credential in it redacted (rules 2 and 3, and rule 1 for `name=value` in text)."""
    if not text:
        return text
    env = _env_pattern(env_secrets())
    if env is not None:
        text = env.sub(REDACTED, text)
    text = _SHAPES.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _URL_USER.sub(lambda m: m.group(1) + REDACTED + "@", text)
    out, pos = [], 0
    for m in _NAME.finditer(text):
        if m.start() < pos or not secret_name(m.group(1)):
            continue
        value = _VALUE.match(text, m.end())
        if value and value.group(2) != REDACTED:
            out += [text[pos:value.start(2)], REDACTED]
            pos = value.end(2)
    return "".join(out) + text[pos:]


def scrub(obj: Any, key: str | None = None) -> Any:
    """A copy of `obj` (dicts, lists, strings, numbers) with every credential redacted; `key` is the name it is
    recorded under. Dict keys are kept (their values are what is secret)."""
    if key is not None and secret_name(key) and obj not in (None, "", False, [], {}):
        return REDACTED
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, dict):
        return {k: scrub(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def split_secrets(obj: Any) -> tuple[Any, dict[str, Any]]:
    """(`obj` scrubbed, {json path: original value} of what scrubbing changed): a config handed to another process
    through a file travels as the first, the second through that process's environment (`restore`), so the file
    holds no secret and the process still trains on exactly what the user gave."""
    clean = scrub(obj)
    secrets: dict[str, Any] = {}

    def walk(original: Any, scrubbed: Any, at: tuple) -> None:
        if isinstance(original, dict) and isinstance(scrubbed, dict):
            for k in original:
                walk(original[k], scrubbed[k], at + (k,))
        elif isinstance(original, (list, tuple)) and isinstance(scrubbed, list) and len(original) == len(scrubbed):
            for i, (a, b) in enumerate(zip(original, scrubbed)):
                walk(a, b, at + (i,))
        elif original != scrubbed:
            secrets["/".join(map(str, at))] = [list(at), original]

    walk(obj, clean, ())
    return clean, secrets


def restore(obj: Any, secrets: dict[str, Any]) -> Any:
    """`obj` (what `split_secrets` scrubbed) with the original values put back in place."""
    for at, value in secrets.values():
        node = obj
        for part in at[:-1]:
            node = node[part]
        node[at[-1]] = value
    return obj
