"""Every variable of a recipe's YAML is used, and every one the code reads exists.

In the spirit of SpeechBrain's ``tests/consistency/test_yaml.py``: a YAML key
that nothing reads is a setting a user may tune to no effect, and a key the
code reads that the YAML lacks fails only when that line runs (often after
minutes of training, or only under DDP). For each recipe file and the Python
that loads it, this test proves statically, in well under a second:

1. every top-level key is used: referenced by another key (``<key>`` or
   ``<key[...]>`` in a ``!ref``/``!copy``, also inside an ``!include:``
   override block), read by the code (``hparams["key"]``, ``hparams.key``,
   ``self.hparams.key``, ``hparams.get("key")``, ``getattr(hparams, "key")``,
   ``"key" in hparams``), named by a string literal in the code (not a
   docstring, a dict-display key or the index of another object), read by
   SpeechBrain itself (its run options, the pretrained interface's needs), or
   listed in ``ALLOWED_UNUSED`` with the reason; keys starting with ``__``
   (``__set_seed``) run for their effect and are exempt;
2. every key the code reads exists: top-level, and one level down when the
   code indexes into an ``!include:`` or a plain mapping
   (``hparams["recognizer"]["decoder"]``); the keys of an ``!include:``
   override block and of the interface overrides exist in the included file.

The code is parsed with ``ast``; a key computed at run time is followed to the
literal it comes from (a loop over a tuple, an f-string, a parameter's default,
a module constant), and a read that cannot be followed fails the test. The
YAML is parsed round-trip with ruamel.yaml, so the tags stay visible.
"""

import ast
import dataclasses
import importlib.util
import itertools
import re
import shutil
from pathlib import Path

import pytest
import ruamel.yaml

ROOT = Path(__file__).resolve().parent.parent
SB_DIR = Path(importlib.util.find_spec("speechbrain").origin).parent
REF_NAME = re.compile(r"<([^<>\[\]]+)")
# Methods of the dict that load_hyperpyyaml returns: not keys.
DICT_METHODS = {"get", "items", "keys", "values", "pop", "setdefault", "update", "copy"}
# Names that hold an EncoderDecoderASR built from sbtemplate/hparams/inference.yaml.
INTERFACE_OBJECTS = {"asr"}
# Callees that may be handed the hparams object without being read here.
HANDED_OK = set()
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

# Keys that nothing reads, kept on purpose: {YAML file: {key: reason}}. An
# entry that becomes used, or whose key goes, fails the test: remove it then.
ALLOWED_UNUSED = {}


@dataclasses.dataclass(frozen=True)
class Source:
    """A Python file that reads the hparams; ``scope``: its top-level functions
    and classes that do (empty: the whole file)."""

    path: str
    scope: tuple = ()


@dataclasses.dataclass
class Reads:
    """What some code reads of a YAML file: ``required`` {key path: where},
    ``optional`` (with a default, or a test), ``mentioned`` (string literals),
    ``mods`` (``asr.mods.<key>``), ``unresolved`` (messages), ``handed_on``
    ((where, callee) of calls given the hparams object) and ``defined`` (the
    functions and classes read)."""

    required: dict = dataclasses.field(default_factory=dict)
    optional: set = dataclasses.field(default_factory=set)
    mentioned: set = dataclasses.field(default_factory=set)
    mods: dict = dataclasses.field(default_factory=dict)
    unresolved: list = dataclasses.field(default_factory=list)
    handed_on: list = dataclasses.field(default_factory=list)
    defined: set = dataclasses.field(default_factory=set)

    def update(self, other):
        """Add ``other``'s reads to these."""
        self.required.update(other.required)
        self.optional |= other.optional
        self.mentioned |= other.mentioned
        self.mods.update(other.mods)
        self.unresolved += other.unresolved
        self.handed_on += other.handed_on
        self.defined |= other.defined


@dataclasses.dataclass(frozen=True)
class Pair:
    """A YAML file, the code that reads it, and what else counts as a read."""

    yaml: str
    sources: tuple
    interface: bool = False  # loaded by EncoderDecoderASR.from_hparams


# ------------------------------------------------------------------ Python --
def _parents(tree):
    """{node: its parent} for every node of ``tree``."""
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _receiver(node):
    """'recipe' for the recipe's hparams (``hparams``, ``self.hparams``,
    ``brain.hparams``), 'interface' for ``asr.hparams``, 'mods' for
    ``asr.mods``, else None."""
    if isinstance(node, ast.Name) and node.id == "hparams":
        return "recipe"
    if isinstance(node, ast.Attribute) and node.attr in ("hparams", "mods"):
        on_interface = isinstance(node.value, ast.Name) and node.value.id in INTERFACE_OBJECTS
        if node.attr == "mods":
            return "mods" if on_interface else None
        return "interface" if on_interface else "recipe"
    return None


def _binds(target, name):
    """Whether the assignment target ``target`` binds ``name``."""
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))


class _Resolver:
    """Follows a key computed at run time to the literals it can take."""

    def __init__(self, tree, parents):
        self.tree, self.parents = tree, parents

    def values(self, expr):
        """The values ``expr`` can take, or None if that cannot be told."""
        try:
            return [ast.literal_eval(expr)]
        except (ValueError, TypeError, SyntaxError, RecursionError):
            pass
        if isinstance(expr, ast.Name):
            return self.name_values(expr.id, expr)
        if isinstance(expr, ast.JoinedStr):
            parts = []
            for part in expr.values:
                if isinstance(part, ast.Constant):
                    parts.append([str(part.value)])
                elif (
                    isinstance(part, ast.FormattedValue)
                    and part.conversion == -1
                    and part.format_spec is None
                ):
                    found = self.values(part.value)
                    if found is None:
                        return None
                    parts.append([str(v) for v in found])
                else:
                    return None
            return ["".join(combo) for combo in itertools.product(*parts)]
        return None

    def _items(self, target, name, iterable):
        """The values ``name`` takes in ``for <target> in <iterable>``."""
        collections = self.values(iterable)
        if collections is None:
            return None
        items = [item for collection in collections for item in collection]
        if isinstance(target, ast.Name):
            return items
        if isinstance(target, ast.Tuple):
            index = [
                i for i, e in enumerate(target.elts) if isinstance(e, ast.Name) and e.id == name
            ]
            if index and all(isinstance(i, (tuple, list)) for i in items):
                return [item[index[0]] for item in items]
        return None

    def name_values(self, name, at):
        """The values the variable ``name`` can hold at node ``at``."""
        node, child = self.parents.get(at), at
        while node is not None:
            if isinstance(node, COMPREHENSIONS):
                for gen in node.generators:
                    if _binds(gen.target, name) and child is not gen.iter:
                        return self._items(gen.target, name, gen.iter)
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                if _binds(node.target, name) and child is not node.iter:
                    return self._items(node.target, name, node.iter)
            elif isinstance(node, FUNCTIONS):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in positional[::-1]], args.defaults[::-1]))
                defaults.update(
                    {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
                )
                if name in defaults:
                    return self.values(defaults[name])
                if name in {a.arg for a in positional + args.kwonlyargs}:
                    return None
            node, child = self.parents.get(node), node
        for statement in self.tree.body:
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id == name
            ):
                return self.values(statement.value)
        return None

    def collection_keys(self, expr):
        """The string keys in the collections ``expr`` can be, or None."""
        found = self.values(expr)
        if found is None or not all(isinstance(v, (tuple, list)) for v in found):
            return None
        found = [key for collection in found for key in collection]
        return found if all(isinstance(v, str) for v in found) else None

    def keys(self, expr):
        """The string keys ``expr`` can be, or None."""
        found = self.values(expr)
        if found is None or not all(isinstance(v, str) for v in found):
            return None
        return found


def _top_level(tree, scope):
    """The nodes of ``tree`` to read: all of it, or the definitions in ``scope``."""
    if not scope:
        return [tree]
    nodes = [n for n in tree.body if getattr(n, "name", None) in scope]
    missing = set(scope) - {n.name for n in nodes}
    assert not missing, f"no top-level definition {sorted(missing)}: update the test's scope"
    return nodes


def collect(path, scope=(), kind="recipe"):
    """The reads of the hparams of ``kind`` in the file ``path`` (within ``scope``)."""
    path = Path(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = _parents(tree)
    resolver = _Resolver(tree, parents)
    reads = Reads()
    for top in _top_level(tree, scope):
        reads.defined |= {
            n.name for n in ast.walk(top) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        }
        for node in ast.walk(top):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            parent = parents.get(node)
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                if _receiver(node.value) != kind:
                    continue
                keys = resolver.keys(node.slice)
                if keys is None:
                    reads.unresolved.append(f"{where}: {ast.unparse(node)}")
                    continue
                below = ()
                if (
                    isinstance(parent, ast.Subscript)
                    and parent.value is node
                    and isinstance(parent.slice, ast.Constant)
                ):
                    below = (parent.slice.value,)
                for key in keys:
                    reads.required[(key, *below)] = where
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                receiver = _receiver(node.value)
                if receiver == "mods" and kind == "interface":
                    reads.mods[node.attr] = where
                elif receiver != kind:
                    continue
                elif isinstance(node.value, ast.Name) and node.attr in DICT_METHODS:
                    if (
                        node.attr == "get"
                        and isinstance(parent, ast.Call)
                        and parent.args
                        and isinstance(parent.args[0], ast.Constant)
                    ):
                        reads.optional.add(parent.args[0].value)
                else:
                    reads.required[(node.attr,)] = where
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if (
                    name in ("getattr", "hasattr")
                    and len(node.args) >= 2
                    and _receiver(node.args[0]) == kind
                    and isinstance(node.args[1], ast.Constant)
                ):
                    reads.optional.add(node.args[1].value)
                if kind == "recipe" and any(
                    isinstance(a, ast.Name) and a.id == "hparams"
                    for a in node.args + [k.value for k in node.keywords]
                ):
                    reads.handed_on.append((where, name))
            elif isinstance(node, ast.Compare) and kind == "recipe":
                if (
                    len(node.ops) == 1
                    and isinstance(node.ops[0], (ast.In, ast.NotIn))
                    and _receiver(node.comparators[0]) == kind
                    and isinstance(node.left, ast.Constant)
                ):
                    reads.optional.add(node.left.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if kind != "recipe":
                    continue  # the interface is read through asr.hparams / asr.mods only
                if isinstance(parent, (ast.Expr, ast.JoinedStr)):
                    continue  # a docstring, or a piece of an f-string
                if isinstance(parent, ast.Dict) and any(k is node for k in parent.keys):
                    continue  # a dict display's key: not a read of the hparams
                if (
                    isinstance(parent, ast.Subscript)
                    and parent.slice is node
                    and _receiver(parent.value) is None
                ):
                    continue  # the index of another object (job["tokenizer"])
                reads.mentioned.add(node.value)
    return reads


def _class_constant(path, cls, name):
    """The literal value of ``cls.name`` in the file ``path``."""
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for statement in node.body:
                if isinstance(statement, ast.Assign) and any(
                    getattr(t, "id", None) == name for t in statement.targets
                ):
                    return ast.literal_eval(statement.value)
    raise AssertionError(f"{path}: no {cls}.{name}")


def run_options():
    """SpeechBrain's run options: Brain and Pretrained take each from the
    hparams when the YAML defines it (max_grad_norm, grad_accumulation_factor...)."""
    tree = ast.parse((SB_DIR / "utils" / "run_opts.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "RunOptions":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("speechbrain.utils.run_opts has no RunOptions")


def framework_reads(pair):
    """What SpeechBrain reads of the pair's YAML by itself."""
    reads = Reads(optional=run_options())
    if pair.interface:
        asr, interfaces = SB_DIR / "inference" / "ASR.py", SB_DIR / "inference" / "interfaces.py"
        loader = collect(interfaces, ("pretrained_from_hparams",))
        reads.required.update(loader.required)  # pretrainer, modules
        for key in _class_constant(asr, "EncoderDecoderASR", "HPARAMS_NEEDED"):
            reads.required[(key,)] = "EncoderDecoderASR.HPARAMS_NEEDED"
        for key in _class_constant(asr, "EncoderDecoderASR", "MODULES_NEEDED"):
            reads.mods[key] = "EncoderDecoderASR.MODULES_NEEDED"
        for extra in (collect(asr, ("EncoderDecoderASR",)), collect(interfaces, ("Pretrained",))):
            reads.optional |= {path[0] for path in extra.required} | extra.optional
    return reads


# -------------------------------------------------------------------- YAML --
def load_yaml(path):
    """The YAML file, round-trip (tags kept)."""
    return ruamel.yaml.YAML(typ="rt").load(Path(path).read_text()) or {}


def _tag(node):
    return getattr(getattr(node, "tag", None), "value", None) or ""


def references(node):
    """The top-level names that the ``!ref``/``!copy`` values in ``node`` name,
    as (name, first index or None): ``<recognizer[decoder]>`` -> (recognizer, decoder)."""
    found = set()
    if _tag(node) in ("!ref", "!copy"):
        for match in re.finditer(r"<([^<>\[\]]+)(?:\[([^<>\[\]]+)\])?", str(node.value)):
            found.add((match.group(1).strip(), match.group(2)))
    if isinstance(node, dict):
        for value in node.values():
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def included_file(yaml_path, node):
    """The file an ``!include:`` node names (beside the including file, or
    from the repository root as the recipes give it), or None."""
    tag = _tag(node)
    if not tag.startswith("!include:"):
        return None
    name = tag[len("!include:") :]
    for base in (Path(yaml_path).parent, ROOT):
        if (base / name).is_file():
            return base / name
    raise AssertionError(f"{yaml_path}: cannot find the included file {name}")


def _nested(document, path):
    """The value at ``path`` (a tuple of keys) in ``document``, or None."""
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


# ------------------------------------------------------------------- check --
def code_reads(pair, root=ROOT):
    """All that the pair's code and SpeechBrain read of its YAML."""
    reads = framework_reads(pair)
    for source in pair.sources:
        path = root / source.path
        if pair.interface:
            reads.update(collect(path, source.scope, kind="interface"))
        else:
            reads.update(collect(path, source.scope))
    return reads


def problems(pair, root=ROOT, allowed=None, includers=()):
    """The inconsistencies between the pair's YAML and its code, one message each.

    ``includers``: (YAML file, path of an override mapping or None) of files that
    include this one or override it through the interface; their references
    into it count as uses, their override keys must exist in it."""
    yaml_path = root / pair.yaml
    name = pair.yaml
    document = load_yaml(yaml_path)
    allowed = ALLOWED_UNUSED.get(name, {}) if allowed is None else allowed
    reads = code_reads(pair, root)
    found = [
        f"{name}: cannot tell which key {r} reads; make it a literal" for r in reads.unresolved
    ]
    found += [
        f"{name}: {where} hands the hparams object to {callee}, which is not in the "
        f"sources this test reads: add its module to the pair"
        for where, callee in reads.handed_on
        if callee not in reads.defined | HANDED_OK
    ]

    used = {ref for key, value in document.items() for ref, _ in references(value) if ref != key}
    used |= {path[0] for path in reads.required} | reads.optional | reads.mentioned
    for other, overrides in includers:
        other_doc = load_yaml(root / other)
        for key, value in other_doc.items():
            inner = included_file(root / other, value)
            if inner and inner.resolve() == yaml_path.resolve():
                for ref_name, index in set().union(*map(references, other_doc.values())):
                    if ref_name == key and index:
                        used.add(index)
        block = _nested(other_doc, overrides) if overrides else None
        for key in block or {}:
            if key not in document:
                found.append(
                    f"{name}: key {key!r} is overridden by {other} "
                    f"({'.'.join(overrides)}) but not defined"
                )

    # (1) every key is used
    readers = (
        "EncoderDecoderASR nor through asr.hparams"
        if pair.interface
        else f"{pair.sources[0].path} nor the other {len(pair.sources) - 1} source(s)"
    )
    for key in document:
        if key.startswith("__") or key in used:
            continue
        if key not in allowed:
            found.append(
                f"{name}: key {key!r} is defined but used nowhere (not referenced "
                f"by another key, not read by {readers})"
            )
    for key in allowed:
        if key not in document or key in used:
            found.append(
                f"{name}: ALLOWED_UNUSED lists {key!r}, which is "
                f"{'used' if key in document else 'gone'}: remove it from the list"
            )

    # (2) every key read exists
    for path, where in sorted(reads.required.items()):
        key = path[0]
        if key not in document:
            found.append(f"{name}: key {key!r} is read by {where} but not defined")
            continue
        value = document[key]
        inner = included_file(yaml_path, value)
        if len(path) > 1:
            keys = load_yaml(inner) if inner else value if not _tag(value) else None
            if isinstance(keys, dict) and path[1] not in keys:
                found.append(f"{name}: key {key}[{path[1]!r}] is read by {where} but not defined")
    modules = document.get("modules", {})
    for key, where in sorted(reads.mods.items()):
        if key not in modules:
            found.append(f"{name}: modules[{key!r}] is read by {where} but not defined")
    for key, value in document.items():
        inner = included_file(yaml_path, value)
        if inner and isinstance(value, dict):
            inner_keys = load_yaml(inner)
            for override in value:
                if override not in inner_keys:
                    found.append(
                        f"{name}: the !include: of {key} overrides {override!r}, "
                        f"which {inner.name} does not define"
                    )
    return found


DISTRIBUTED = tuple(
    Source(f"sbtemplate/distributed/{p.name}")
    for p in sorted((ROOT / "sbtemplate" / "distributed").glob("*.py"))
)
RECIPE_CODE = ("finetune.py", "multisource_mini_recipe.py", "single_node_pretrained.py")
# What reads finetune.py's YAML (finetune.yaml and its real-RNNLM variant).
FINETUNE_CODE = (
    Source("finetune.py"),
    Source("sbtemplate/run_setup.py"),
    Source("sbtemplate/ddp_dynamic_batching.py"),
    Source("sbtemplate/finetune_eval.py"),
    Source("sbtemplate/fetching/recipe.py", ("use_endpoints", "collect_pretrained")),
    Source("sbtemplate/frozen.py"),
    *DISTRIBUTED,
)
PAIRS = {
    "finetune": Pair(
        "finetune.yaml",
        FINETUNE_CODE,
    ),
    # The same recipe on the real RNNLM's repo (its stock hyperparams.yaml).
    "finetune_rnnlm_librispeech": Pair(
        "finetune_rnnlm_librispeech.yaml",
        FINETUNE_CODE,
    ),
    "single_node": Pair(
        "single_node_pretrained.yaml",
        (Source("single_node_pretrained.py"),),
    ),
    "multisource": Pair(
        "multisource_mini_recipe.yaml",
        (
            Source("multisource_mini_recipe.py"),
            Source("sbtemplate/fetching/recipe.py", ("use_endpoints",)),
        ),
    ),
    "base_asr": Pair(
        "sbtemplate/hparams/base_asr.yaml",
        (Source("sbtemplate/base_recognizer.py", ("ASRBrain", "asr_datasets", "train_asr")),),
    ),
    "base_lm": Pair(
        "sbtemplate/hparams/base_lm.yaml",
        (
            Source("sbtemplate/base_recognizer.py", ("LMBrain",)),
            Source("sbtemplate/build.py", ("_train_lm",)),
        ),
    ),
    # Every module that may hold an EncoderDecoderASR as ``asr``.
    "inference": Pair(
        "sbtemplate/hparams/inference.yaml",
        tuple(
            Source(str(p.relative_to(ROOT)))
            for p in sorted((ROOT / "sbtemplate").rglob("*.py")) + [ROOT / c for c in RECIPE_CODE]
        ),
        interface=True,
    ),
}
# Files that include inference.yaml or override it through from_hparams.
INFERENCE_INCLUDERS = (
    ("finetune.yaml", ("decoding_overrides",)),
    ("multisource_mini_recipe.yaml", ("asr_model", "overrides")),
)


@pytest.mark.parametrize("pair", PAIRS)
def test_yaml_and_code_agree(pair):
    includers = INFERENCE_INCLUDERS if PAIRS[pair].interface else ()
    found = problems(PAIRS[pair], includers=includers)
    assert not found, "\n".join(found)


def test_the_check_catches_an_unused_and_a_missing_key(tmp_path):
    """A scratch copy of finetune.yaml with a key nobody reads, and of
    finetune.py reading a key the YAML lacks: both are reported, by name."""
    pair = PAIRS["finetune"]
    for source in pair.sources:
        (tmp_path / source.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source.path, tmp_path / source.path)
    (tmp_path / "finetune.yaml").write_text(
        (ROOT / "finetune.yaml").read_text() + "\norphan_setting: 3   # read by nothing\n"
    )
    script = tmp_path / "finetune.py"
    script.write_text(
        script.read_text().replace(
            'hparams["test_limit"]', 'hparams["test_limit"] or hparams["missing_setting"]', 1
        )
    )
    assert problems(pair) == []  # the real files agree
    found = problems(pair, root=tmp_path)
    assert any(
        "finetune.yaml" in f and "'orphan_setting'" in f and "used nowhere" in f for f in found
    ), found
    assert any(
        "finetune.yaml" in f and "'missing_setting'" in f and "finetune.py:" in f for f in found
    ), found
    assert len(found) == 2, found
