"""One shipped code file per checkpoint: the package's modules bundled into `modeling_unime.py`.

transformers logs one "A new version of the following files was downloaded" notice per code file it
fetches from the Hub (the file itself and, recursively, each relative import), so a checkpoint that
shipped the package's eleven modules printed eleven notices on its first load. `save_pretrained`
therefore replaces the copied modules with one bundle: the modules concatenated in dependency order,
with their relative imports removed (every name then lives in the one module namespace) and their
absolute imports kept. Building refuses a module that imports a module object (`from . import x`) and
two modules defining one top-level name differently, which the bundle could not keep apart.

Code that runs from a bundle (loaded with `trust_remote_code=True`) has no package to read: the
bundle is its own source, and a re-save copies it unchanged.
"""

import ast
import json
from pathlib import Path

BUNDLE_FILE = "modeling_unime.py"
# The classes a checkpoint's configs name, all defined in the bundle.
AUTO_MAPS = {
    "config.json": {"AutoConfig": "modeling_unime.UniMEConfig", "AutoModel": "modeling_unime.UniMEModel"},
    "processor_config.json": {"AutoProcessor": "modeling_unime.UniMEProcessor"},
}
ROOT_MODULES = ("configuration_unime", "modeling_unime", "processing_unime", "sentence_transformers_module")
BUNDLE_MARK = "_UNIME_BUNDLE_"  # set at the top of a bundle; `globals()` has it only when running from one


def _relative_imports(tree, module):
    """`(node, imported module name, is top level)` of every relative import in `tree`."""
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module is None or node.level > 1:
                names = ", ".join(alias.name for alias in node.names)
                raise ValueError(f"{module}.py line {node.lineno}: 'from {'.' * node.level} import {names}' imports "
                                 "a module object, which a single-file bundle cannot provide; import names instead")
            renamed = [alias for alias in node.names if alias.asname and alias.asname != alias.name]
            if renamed:
                raise ValueError(f"{module}.py line {node.lineno}: 'import {renamed[0].name} as {renamed[0].asname}' "
                                 "renames a name, which a single-file bundle cannot keep; import it unrenamed")
            found.append((node, node.module, id(node) in top_level))
    return found


def _defined_names(node):
    """Top-level names a statement binds (functions, classes, assignment targets)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [leaf.id for target in targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name)]
    return []


def module_order(sources):
    """Module names reachable from `ROOT_MODULES` in `sources` (`{name: text}`), each after the modules it
    imports at top level (imports inside functions run later and only make a module reachable)."""
    trees = {name: ast.parse(text, filename=f"{name}.py") for name, text in sources.items()}
    order, visiting = [], []

    def visit(name):
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"relative imports form a circle: {' -> '.join(visiting[visiting.index(name):] + [name])}")
        if name not in trees:
            raise ValueError(f"{visiting[-1]}.py imports .{name}, which is not a module of the package")
        visiting.append(name)
        imports = _relative_imports(trees[name], name)
        for _, imported, top_level in imports:
            if top_level:
                visit(imported)
        visiting.pop()
        order.append(name)
        for _, imported, top_level in imports:
            if not top_level:
                visit(imported)

    for root in ROOT_MODULES:
        if root in trees:
            visit(root)
    return order


def _strip_module(name, text):
    """`(body text without relative imports or module docstring, {top-level name: statement source})`."""
    tree = ast.parse(text, filename=f"{name}.py")
    lines = text.splitlines()
    replacements = {}  # first line index -> (last line index, replacement lines)
    for node, _, top_level in _relative_imports(tree, name):
        indent = lines[node.lineno - 1][: node.col_offset]
        # A nested import becomes `pass` so that a body holding only the import stays valid.
        replacements[node.lineno - 1] = (node.end_lineno - 1, [] if top_level else [f"{indent}pass"])
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        replacements[body[0].lineno - 1] = (body[0].end_lineno - 1, [])
    kept, index = [], 0
    while index < len(lines):
        if index in replacements:
            last, replacement = replacements[index]
            kept.extend(replacement)
            index = last + 1
        else:
            kept.append(lines[index])
            index += 1
    definitions = {}
    for node in body:
        for defined in _defined_names(node):
            definitions[defined] = ast.get_source_segment(text, node)
    return "\n".join(kept).strip("\n"), definitions


def build_bundle(sources):
    """The bundle text of the modules `sources` (`{module name: source text}`).

    Raises:
        ValueError: a module imports a module object or a renamed name, the relative imports form a
            circle, or two modules define one top-level name with different source.
    """
    parts = [f'"""UniME: the modules of the `modeling_unime` package in one file (built by bundle.py)."""\n\n'
             f"{BUNDLE_MARK} = True\n"]
    owners = {}
    for name in module_order(sources):
        text, definitions = _strip_module(name, sources[name])
        for defined, statement in definitions.items():
            owner = owners.setdefault(defined, (name, statement))
            if owner[1] != statement:
                raise ValueError(f"{owner[0]}.py and {name}.py both define {defined!r} differently; a single-file "
                                 "bundle would keep only the later one: rename one of them")
        parts.append(f"# ---- {name}.py ----\n\n{text}\n")
    bundle = "\n\n".join(parts)
    compile(bundle, BUNDLE_FILE, "exec")
    return bundle


def package_sources():
    """`{module name: source text}` of this package's modules (`__init__` and this file's helpers included
    only as they are imported)."""
    folder = Path(__file__).parent
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.py"))
            if path.stem != "__init__"}


def bundle_text():
    """The bundle to ship: this file itself when running from a bundle, else built from the package."""
    if globals().get(BUNDLE_MARK):
        return Path(__file__).read_text(encoding="utf-8")
    return build_bundle(package_sources())


def write_bundle(directory):
    """Replace the code files `save_pretrained` copied into `directory` with the bundle, and point the
    `auto_map`s of its configs and the module type in `modules.json` at the bundle's classes."""
    directory = Path(directory)
    text = bundle_text()
    for name in _bundled_module_names(text):
        file = directory / f"{name}.py"
        if file.is_file():
            file.unlink()
    (directory / BUNDLE_FILE).write_text(text, encoding="utf-8")
    for config_name, auto_map in AUTO_MAPS.items():
        file = directory / config_name
        if file.is_file():
            config = json.loads(file.read_text(encoding="utf-8"))
            if "auto_map" in config:
                config["auto_map"] = {**config["auto_map"], **auto_map}
                file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        for module in modules:
            if module.get("type", "").endswith(".UniMESentenceTransformer"):
                module["type"] = "modeling_unime.UniMESentenceTransformer"
        modules_file.write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


def replaced_code_files():
    """Names of the files a save's bundle replaces: an older checkpoint layout shipped the modules one by one,
    and a save over such a folder drops them (atomic.atomic_directory's `replaced`)."""
    return tuple(f"{name}.py" for name in _bundled_module_names(bundle_text()))


def _bundled_module_names(text):
    """Module names a bundle holds, read from its `# ---- name.py ----` section lines."""
    prefix, suffix = "# ---- ", ".py ----"
    return [line[len(prefix):-len(suffix)] for line in text.splitlines()
            if line.startswith(prefix) and line.endswith(suffix)]
