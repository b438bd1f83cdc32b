"""Helpers shared by the experiment configs (big_vision style ``file.py:arg`` parsing)."""

from __future__ import annotations


def parse_arg(arg: str | None, *, positional: tuple[str, ...] = (), **spec):
    """Parses ``"homo,tiny,batch_size=64"`` into typed fields.

    Tokens are separated by commas. ``key=value`` sets ``key`` (converted with the type of its
    default in ``spec``); a bare token that names a boolean in ``spec`` switches it on; any other
    bare token fills the next name of ``positional``.

    Args:
      arg: the text after ``:`` in ``--config=configs/qm9.py:arg`` (None or "" for defaults).
      positional: names that bare, non-boolean tokens fill in order.
      **spec: every accepted name with its default value (bool, int, float or str).

    Returns:
      An object with one attribute per name in ``spec``.

    Raises:
      ValueError: for an unknown name, a surplus positional token or a malformed value.
    """
    values = dict(spec)
    free = list(positional)
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if "=" in token:
            key, text = token.split("=", 1)
            if key not in spec:
                raise ValueError(f"config arg {arg!r}: unknown key {key!r}; known: {sorted(spec)}")
            values[key] = _convert(text, spec[key], key)
        elif isinstance(spec.get(token), bool):
            values[token] = True
        elif free:
            values[free.pop(0)] = token
        else:
            raise ValueError(f"config arg {arg!r}: unexpected token {token!r}; known: {sorted(spec)}")
    return type("ConfigArgs", (), values)()


def _convert(text: str, default, key: str):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config arg {key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return type(default)(text)
    except ValueError as err:
        raise ValueError(f"config arg {key}={text!r}: expected {type(default).__name__}") from err
