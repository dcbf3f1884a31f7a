"""Clear errors for a recipe's YAML file and its command-line overrides.

HyperPyYAML reads the file's text, so a syntax error names ``<unicode
string>`` instead of the file; and an override of a number with text
(``--number_of_epochs=abc``) fails later in some ``int()`` that names neither
the key nor the file. Both are checked here, before the YAML is loaded.
"""

from pathlib import Path


class ConfigError(ValueError):
    """A recipe's YAML file or one of its overrides is wrong."""


def read_yaml_file(path):
    """The text of ``path``; a file that cannot be read is named."""
    path = Path(path)
    try:
        return path.read_text()
    except OSError as error:
        raise ConfigError(
            f"cannot read the hyperparameters file {path}: {error.strerror or error}"
        ) from None


def check_yaml_text(path, text):
    """Parse ``text`` (the contents of ``path``) as plain YAML, nothing
    resolved; a syntax error names the file, line and column."""
    import ruamel.yaml

    try:
        return ruamel.yaml.YAML(typ="rt").load(text) or {}
    except ruamel.yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None


def check_override_types(path, overrides, document):
    """Each override of a key whose value in ``document`` (the file ``path``,
    parsed by :func:`check_yaml_text`) is a plain boolean or number must be
    one too (an integer for an integer), or null."""
    for key, value in (overrides or {}).items():
        if key not in document:
            continue  # HyperPyYAML itself reports keys the file lacks
        default = document[key]
        expected = _plain_type(default)
        if expected is None or value is None or _plain_type(value) in _ACCEPTED[expected]:
            continue  # null switches a value off
        raise ConfigError(
            f"--{key}={value!r}: {path} gives {key} as {expected} ({default}); {value!r} is not one"
        )


_ACCEPTED = {
    "a boolean": ("a boolean",),
    "an integer": ("an integer",),
    "a number": ("a number", "an integer"),
}


def _plain_type(value):
    # ruamel's round-trip types: ScalarBoolean is an int, not a bool.
    if type(value).__name__ == "ScalarBoolean" or isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return None
