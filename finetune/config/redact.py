"""Hide secrets before text is printed, logged or published: token-shaped values wherever they appear (a Hub token
pasted into data.system_prompt is still a Hub token), and the value of any key whose name says it is a secret.

`redact(text)` is the one function for this: the config echo at training start, the crash report and `publish`
all call it, so they agree on what a secret looks like.
"""

from __future__ import annotations

import re

MASK = "***"

# Shapes of real credentials; long enough that ordinary words, hashes and paths do not match.
TOKEN_SHAPES = (
    r"hf_[A-Za-z0-9]{20,}",  # Hugging Face user / org access tokens
    r"api_org_[A-Za-z0-9]{20,}",  # Hugging Face organisation API tokens (old form)
    r"sk-(?:proj-|ant-|live_|test_)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic, Stripe secret keys
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{30,}",
    r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab personal access tokens
    r"xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
    r"AIza[0-9A-Za-z_-]{35}",  # Google API keys
)
_TOKENS = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(TOKEN_SHAPES) + r")")
# `Authorization: Bearer xyz` and credentials inside URLs (https://user:secret@host).
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+(@)")
# YAML / JSON / env lines whose key names a secret; null/true/false and empty values are kept as they are.
# The key must *end* in token/api_key/... (max_new_tokens, tokenizer are not secrets) or contain secret/password.
SECRET_KEY = (r"(?:[\w.-]*(?:secret|password|passwd)[\w-]*"  # dotted keys too: the job echo prints model.hub_token
              r"|[\w.-]*(?:token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?))")
_KEY_LINE = re.compile(
    r"(?im)^(\s*[\"']?" + SECRET_KEY + r"[\"']?\s*[:=]\s*)(?![\"']?(?:null|none|true|false|~)?[\"']?\s*,?\s*$)(\S.*?)(,?)\s*$"
)


def redact(text: str) -> str:
    """`text` with every token-shaped value, bearer token, URL password and secret-named key's value masked."""
    text = _KEY_LINE.sub(lambda m: f"{m.group(1)}{_quoted_mask(m.group(2))}{m.group(3)}", text)
    text = _TOKENS.sub(MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(2), text)


def find_secret(text: str) -> str | None:
    """A short description of the first token-shaped value in `text` (never the value itself), or None."""
    match = _TOKENS.search(text) or _BEARER.search(text) or _URL_PASSWORD.search(text)
    if match is None:
        return None
    return f"a value shaped like a credential ({match.group(0)[:4]}...) at character {match.start()}"


def _quoted_mask(value: str) -> str:
    """Keep the YAML/JSON valid: a quoted value stays quoted."""
    if value[:1] in "\"'":
        return value[0] + MASK + value[0]
    return f"'{MASK}'"
