"""The command-line edge of the entry points, before Hydra sees ``sys.argv``.

- ``--help`` / ``-h``: a usage line, the main keys with their defaults and one-line meanings (from the comments of
  the config file), the config groups with their choices, and the examples of the script's docstring.
- Free text as typed: the values of the entry point's free-text keys (prompts, paths) are quoted for Hydra's
  override grammar, so ``prompt="restore detail, preserve framing"`` or a file named ``a,b ${x}.png`` reach the
  config verbatim (no list, no sweep, no interpolation). Values the user already quoted are left alone.
- Unknown keys, with or without ``+``: one ``error:`` line naming the nearest valid keys, exit status 2. ``+key``
  may only add a keyword argument to a section that builds an object (``_target_``: ``+trainer.profiler=simple``)
  or an entry to a collection of such sections (``+callbacks.name._target_=...``); anything else would be ignored.

Runs with ``-m`` / ``--multirun`` or another config (``-cn``, ``-cp``, ``-cd``) are passed to Hydra unchanged.
"""

import difflib
import functools
import inspect
import re
import sys
from pathlib import Path

from latentup.errors import ConfigError, exit_on_error

PASS_THROUGH_FLAGS = {"-m", "--multirun", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun"}
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_GROUP_LINE = re.compile(r"^\s*-\s+(?P<group>[\w/]+):\s*(?P<value>[^#\s]+)")


def command(config_dir, config_name: str, doc: str, free_text=()):
    """Decorator for an entry point's ``main(cfg)``: ``hydra.main`` behind :func:`prepare_arguments`."""
    import hydra

    def decorate(task):
        hydra_main = hydra.main(version_base=None, config_path=str(config_dir), config_name=config_name)(task)

        @functools.wraps(task)
        def main():
            with exit_on_error():
                sys.argv[1:] = prepare_arguments(sys.argv[1:], Path(config_dir), config_name, doc, free_text,
                                                 script=Path(sys.argv[0]).name)
            hydra_main()

        return main

    return decorate


def prepare_arguments(args: list[str], config_dir: Path, config_name: str, doc: str, free_text=(),
                      script: str = "script.py") -> list[str]:
    """The arguments for Hydra: help printed (exit 0), free text quoted, keys checked (a ConfigError)."""
    if "--help" in args or "-h" in args:
        print(help_text(config_dir, config_name, doc, script))
        sys.exit(0)
    if PASS_THROUGH_FLAGS & {a.split("=")[0] for a in args}:
        return args
    overrides, flags = [], []
    for i, arg in enumerate(args):
        after_flag = i and args[i - 1] in FLAGS_WITH_VALUE and "=" not in arg
        (flags if arg.startswith("-") or after_flag else overrides).append(arg)
    overrides = check_keys([quote_free_text(a, free_text) for a in overrides], config_dir, config_name, script)
    return flags + overrides


def quote(text: str) -> str:
    """``text`` as a Hydra quoted string that reads back verbatim: ``${`` escaped (no interpolation), quotes and
    the backslashes before them (or at the end) escaped."""
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


def quote_free_text(arg: str, free_text) -> str:
    """``key=value`` with the value quoted when ``key`` is free text (kept: already quoted values and ``null``)."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+~") not in free_text or value == "null":
        return arg
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return arg
    return f"{key}={quote(value)}"


def _paths(node, prefix="") -> dict:
    """Every dotted key of a nested dict -> its value (dicts included)."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, dict):
            out |= _paths(value, path + ".")
    return out


def _groups(config_dir: Path, config_name: str) -> dict[str, str]:
    """The config groups of the primary config's defaults list -> their default choice."""
    groups = {}
    for line in (config_dir / f"{config_name}.yaml").read_text().splitlines():
        match = _GROUP_LINE.match(line)
        if match and not match["group"].startswith(("override", "hydra")):
            groups[match["group"]] = match["value"]
    return groups


def _choices(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _nearest(word: str, candidates) -> str:
    """The nearest candidates: by whole name, else by last part (stepz -> model.validation.steps), else the best
    three at all."""
    candidates = list(candidates)
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.75)
    if not close:
        leaves = {c: c.rpartition(".")[2] for c in candidates}
        names = difflib.get_close_matches(word.rpartition(".")[2], set(leaves.values()), n=3, cutoff=0.75)
        close = [c for c in candidates if leaves[c] in names][:3]
    close = close or difflib.get_close_matches(word, candidates, n=3, cutoff=0.0)
    return f"did you mean {' or '.join(close)}?" if close else "see --help"


def check_keys(args: list[str], config_dir: Path, config_name: str, script: str) -> list[str]:
    """The overrides ``args`` checked: a ConfigError for one Hydra would refuse (or silently ignore): not
    ``key=value``, an unknown key or group choice, several values outside ``-m``. ``+`` on an existing key (which
    Hydra refuses) is dropped."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    groups = _groups(config_dir, config_name)
    selected, others = [], []
    for arg in args:
        if "=" not in arg and not arg.startswith("~"):
            raise ConfigError(f"argument {arg!r} is not key=value: e.g. input={arg} (python {script} --help)")
        try:
            override = parser.parse_override(arg)
        except HydraException as error:
            reason = str(error).strip().splitlines()[0]
            raise ConfigError(f"cannot read the argument {arg!r} ({reason}): quote text values, e.g. key='a, b'")
        key = override.key_or_group
        if key.startswith(("hydra.", "hydra/")) or override.is_delete():
            continue
        if not override.value_type.name == "ELEMENT":
            raise ConfigError(f"{arg}: several values are a sweep (only with -m); for a list write {key}=[a,b], for "
                              f"text with commas quote it: {key}='a, b'")
        if key in groups:
            value = override.value()
            if value is not None and not (config_dir / key / f"{value}.yaml").is_file():
                choices = _choices(config_dir, key)
                raise ConfigError(f"unknown {key} {value!r}: {_nearest(str(value), choices)} "
                                  f"(choices: {', '.join(choices)})")
            if override.is_add():  # +group=x would add a second entry after the experiment's: a plain choice
                args = [arg.lstrip("+") if a == arg else a for a in args]
                arg = arg.lstrip("+")
            selected.append(arg)
        else:
            others.append((arg, override))
    if not others:
        return args
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            config = OmegaConf.to_container(compose(config_name, selected), resolve=False)
    except HydraException as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"cannot compose the config from {' '.join(selected)}: {reason}") from None
    known = _paths(config)
    for arg, override in others:
        key = override.key_or_group
        adding = override.is_add() or override.is_force_add()
        if key in known:
            if override.is_add():  # Hydra refuses "+" on an existing key: it is a plain change
                args = [arg.lstrip("+") if a == arg else a for a in args]
            continue
        if adding and _may_add(key, known):
            continue
        parent, _, name = key.rpartition(".")
        if adding and isinstance(known.get(parent), dict) and "_target_" in known[parent]:
            target = known[parent]["_target_"]
            options = [f"{parent}.{p}" for p in _parameters(target) or ()]
            raise ConfigError(f"cannot add {key}: {target} takes no keyword {name!r} ({_nearest(key, options)})")
        raise ConfigError(f"unknown key {key!r} for {script}: {_nearest(key, known)} "
                          f"(python {script} --help lists the keys)")
    return args


def _may_add(key: str, known: dict) -> bool:
    """Whether ``+key`` reaches an object: a keyword its section's ``_target_`` accepts, or a new entry of a
    collection of such sections."""
    parent, _, name = key.rpartition(".")
    node = known.get(parent) if parent else None
    if isinstance(node, dict) and "_target_" in node:
        return _accepts(node["_target_"], name)
    grand = parent.rpartition(".")[0]
    collection = known.get(grand) if grand else None
    if parent not in known and isinstance(collection, dict) and collection:
        return all(isinstance(v, dict) and "_target_" in v for v in collection.values() if v is not None)
    return False


def _accepts(target: str, name: str) -> bool:
    """Whether the callable ``target`` takes a keyword ``name`` (any, with ``**kwargs``; unknown targets: yes)."""
    parameters = _parameters(target)
    return parameters is None or name in parameters


def _parameters(target: str) -> list[str] | None:
    """The keyword names of the callable ``target``; None when it takes any (``**kwargs``) or cannot be imported."""
    from hydra.utils import get_method

    try:
        parameters = inspect.signature(get_method(target)).parameters
    except Exception:  # noqa: BLE001 - a target that cannot be imported is Hydra's error to report, later
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return list(parameters)


def _config_lines(path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, default as written, comment) of every key line of a config file, outside ``defaults`` and
    ``hydra``."""
    out, stack, skip = [], [], None
    for line in path.read_text().splitlines():
        match = _KEY_LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"])
        stack = [(d, k) for d, k in stack if d < depth]
        if skip is not None and depth > skip:
            continue
        skip = None
        key, value = match["key"], match["value"].strip()
        if not stack and key in ("defaults", "hydra"):
            skip = depth
            continue
        stack.append((depth, key))
        out.append((".".join(k for _, k in stack), value, (match["comment"] or "").strip()))
    return out


def help_text(config_dir: Path, config_name: str, doc: str, script: str) -> str:
    """Usage, keys (default, meaning), config groups (choices) and the docstring's examples."""
    summary, _, rest = doc.strip().partition("\n")
    examples = [line.strip() for line in rest.splitlines() if line.strip().startswith("python ")]
    rows = [(f"{k}={v}" if v else f"{k}.*", c) for k, v, c in _config_lines(config_dir / f"{config_name}.yaml")
            if v or c]
    groups = _groups(config_dir, config_name)
    rows += [(f"{g}={d}", "one of: " + ", ".join(_choices(config_dir, g))) for g, d in groups.items()]
    width = min(34, max(len(r[0]) for r in rows))
    lines = [f"usage: python {script} [key=value ...]", "", summary, "", "keys (key=default: meaning):"]
    for left, meaning in rows:
        lines.append(f"  {left:<{width}}  {meaning}".rstrip() if len(left) <= width else f"  {left}\n"
                     f"  {'':<{width}}  {meaning}".rstrip())
    lines += ["", "Text values (prompts, paths) are taken as typed: prompt=\"a, b\" needs no extra quoting.",
              f"A group's own keys are group.key=value; python {script} --cfg job prints the whole config."
              if groups else "", "", "examples:", *(f"  {e}" for e in examples)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
