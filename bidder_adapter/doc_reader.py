"""Typed reads from a parsed YAML/JSON document, collecting errors that name their path."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    dict: "mapping",
    type(None): "null",
}


def describe(value: object) -> str:
    """A value's YAML-level type, with the value itself when it is short and scalar."""
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, bool | int | float | str) and len(repr(value)) <= 40:
        return f"{name} {value!r}"
    return name


def join(path: str, key: str) -> str:
    """`partners[0]` + `segtax` -> `partners[0].segtax`; the document root has the empty path."""
    return f"{path}.{key}" if path else key


class DocReader:
    """Reads values out of plain dicts and lists; each bad value adds one message to `errors`.

    Readers return a harmless default after an error, so one pass reports every problem
    and callers check `errors` once at the end instead of after each field.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def mapping(self, value: object, path: str) -> Mapping[str, object] | None:
        if isinstance(value, Mapping):
            return value
        self.fail(path, f"must be a mapping, got {describe(value)}")
        return None

    def check_keys(
        self,
        doc: Mapping[str, object],
        path: str,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> None:
        required = tuple(required)
        known = set(required) | set(optional)
        for key in doc:
            if key not in known:
                where = join(path, key) if isinstance(key, str) else path or "<document>"
                self.fail(where, "unknown key" if isinstance(key, str) else f"{key!r}: unknown key")
        for key in required:
            if key not in doc:
                self.fail(join(path, key), "required key is missing")

    def string(self, doc: Mapping[str, object], key: str, path: str) -> str:
        """`doc[key]` if it is a string; "" when missing (check_keys reports that)."""
        if key not in doc:
            return ""
        return self._string(doc[key], join(path, key))

    def integer(self, doc: Mapping[str, object], key: str, path: str) -> int:
        if key not in doc:
            return 0
        value = doc[key]
        # bool is an int subclass in Python; `segtax: true` is a mistake, not a 1.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self.fail(join(path, key), f"must be an integer, got {describe(value)}")
        return 0

    def strings(self, doc: Mapping[str, object], key: str, path: str) -> tuple[str, ...]:
        if key not in doc:
            return ()
        value = doc[key]
        if not isinstance(value, list):
            self.fail(join(path, key), f"must be a list of strings, got {describe(value)}")
            return ()
        return tuple(self._string(item, f"{join(path, key)}[{i}]") for i, item in enumerate(value))

    def string_map(self, doc: Mapping[str, object], key: str, path: str) -> dict[str, str]:
        if key not in doc:
            return {}
        value = self.mapping(doc[key], join(path, key))
        if value is None:
            return {}
        result: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                self.fail(join(path, key), f"keys must be strings, got {describe(k)}")
                continue
            result[k] = self._string(v, join(join(path, key), k))
        return result

    def _string(self, value: object, path: str) -> str:
        if isinstance(value, str):
            return value
        # YAML turns unquoted 806 into an integer; taxonomy ids are strings on the wire.
        hint = " (quote it in YAML)" if isinstance(value, int | float) else ""
        self.fail(path, f"must be a string{hint}, got {describe(value)}")
        return ""
