"""Every setting has exactly one default, in the property files (a static scan of the code).

For each of our models, the keys its code reads as ``config["key"]`` (in the model's and its
trainer's modules and every recbole_llm module they import, function-level imports included)
must have a default in its property files (ours: overall.yaml and the model's yaml; RecBole's:
its overall and quick-start files, or a key RecBole sets itself); and every key of our property
files must be read somewhere in recbole_llm or be one of RecBole's own settings. And every key any
module reads (a grep for ``config["key"]``) is set by a property file or declared, with its
reason, in ``checks.INTERNAL_SETTINGS``: the unknown-setting warning knows it without reading
the source at run time.
"""
import ast
import re
from pathlib import Path

import pytest

import recbole_llm
from recbole_llm import checks, registry
from recbole_llm.config import properties_dir
from recbole_llm.yaml_io import read_yaml

PACKAGE = Path(recbole_llm.__file__).parent
RECBOLE = checks.RECBOLE_PROPERTIES
#: Where a config is read: ``config[...]``, ``self.config[...]``, ``config.final_config_dict[...]``.
CONFIG_NAMES = {"config", "final_config_dict"}
#: A setting read in the source, as text: ``config["key"]``, ``id_config['key']``...
SETTING_READ = re.compile(r"""config\[\s*["'](\w+)["']\s*\]""")


def _yaml_keys(path: Path) -> set[str]:
    data = read_yaml(path) if path.is_file() else None
    return set(data) if isinstance(data, dict) else set()


def _module_path(name: str) -> Path | None:
    """The file of recbole_llm module ``name`` (found without importing it), or None."""
    base = PACKAGE.parent.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """recbole_llm modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from package import module
    return {name for name in found if name.startswith("recbole_llm") and _module_path(name)}


def _closure(modules: set[str]) -> set[Path]:
    seen, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += _imports(_module_path(name))
    return {_module_path(name) for name in seen}


def _config_reads(path: Path) -> set[str]:
    """Keys read as ``<config>["key"]`` in ``path``."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str):
            target = node.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name in CONFIG_NAMES:
                keys.add(node.slice.value)
    return keys


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _recbole_defaults() -> set[str]:
    files = [RECBOLE / "overall.yaml", RECBOLE / "dataset" / "sample.yaml", *sorted((RECBOLE / "quick_start_config").glob("*.yaml"))]
    return set(checks.INTERNAL_SETTINGS).union(*(_yaml_keys(f) for f in files))


def _model_modules(name: str) -> set[str]:
    model, trainer = registry.MODELS[name]
    return {target.split(":")[0] for target in (model, trainer) if target}


def missing_defaults(name: str, properties: Path) -> dict[str, list[str]]:
    """key -> files that read it, for keys without a default in ``name``'s property files."""
    defaults = _recbole_defaults() | _yaml_keys(properties / "overall.yaml") \
        | _yaml_keys(properties / "model" / f"{name}.yaml")
    missing: dict[str, list[str]] = {}
    for path in sorted(_closure(_model_modules(name))):
        for key in sorted(_config_reads(path) - defaults):
            missing.setdefault(key, []).append(str(path.relative_to(PACKAGE.parent)))
    return missing


def undeclared_reads(package: Path = PACKAGE, properties: Path | None = None) -> dict[str, list[str]]:
    """key -> files of ``package`` that read it as ``config["key"]`` (the grep that ``known_settings``
    once ran over the package at run time), for keys that no property file sets and
    ``checks.INTERNAL_SETTINGS`` does not declare: a user who sets one would be told nothing reads it."""
    known = checks.known_settings(properties or properties_dir())
    undeclared: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for key in sorted(set(SETTING_READ.findall(path.read_text(encoding="utf-8"))) - known):
            undeclared.setdefault(key, []).append(path.name)
    return undeclared


def unused_keys(properties: Path) -> dict[str, list[str]]:
    """key -> our property files that set it, for keys neither our code nor RecBole reads."""
    recbole = set(checks.INTERNAL_SETTINGS).union(*(_yaml_keys(f) for f in RECBOLE.rglob("*.yaml")))
    used = set().union(*(_string_constants(p) for p in PACKAGE.rglob("*.py")))
    unused: dict[str, list[str]] = {}
    for path in sorted(properties.rglob("*.yaml")):
        for key in sorted(_yaml_keys(path) - recbole - used):
            unused.setdefault(key, []).append(path.name)
    return unused


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_every_setting_the_code_reads_has_a_default_in_the_property_files(name):
    assert _closure(_model_modules(name)), name
    assert missing_defaults(name, properties_dir()) == {}


def test_every_key_of_our_property_files_is_read():
    assert unused_keys(properties_dir()) == {}


def test_the_scan_sees_a_read_without_default_and_an_unused_key(tmp_path):
    """The checks above can fail: a copy of our property files with one key dropped and one added."""
    copy = tmp_path / "properties"
    for path in properties_dir().rglob("*.yaml"):
        target = copy / path.relative_to(properties_dir())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    model_yaml = copy / "model" / "E4SRec.yaml"
    text = model_yaml.read_text(encoding="utf-8")
    model_yaml.write_text(text.replace("\nscore_head:", "\n# score_head:") + "\nnobody_reads_this: 1\n",
                          encoding="utf-8")
    assert missing_defaults("E4SRec", copy) == {"score_head": ["recbole_llm/model/e4srec.py"]}
    assert unused_keys(copy) == {"nobody_reads_this": ["E4SRec.yaml"]}


def test_every_setting_the_code_reads_is_in_a_property_file_or_declared():
    assert undeclared_reads() == {}


def test_the_grep_sees_a_setting_read_that_nothing_declares(tmp_path):
    (tmp_path / "module.py").write_text('value = config["nobody_declares_this"] + config["epochs"]\n')
    assert undeclared_reads(tmp_path) == {"nobody_declares_this": ["module.py"]}


def test_a_property_file_is_read_as_recbole_reads_it(tmp_path):
    """``1e-4`` is a number, as in the run's config (``yaml.safe_load`` reads it as a string)."""
    (tmp_path / "a.yaml").write_text("learning_rate: 1e-4\nepochs: 2\n")
    assert read_yaml(tmp_path / "a.yaml") == {"learning_rate": 1e-4, "epochs": 2}
