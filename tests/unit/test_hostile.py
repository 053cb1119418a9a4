"""Hostile configuration through the real entry points: Invoke's own Program (the code behind the `invoke`
command) loading the project's invoke.yaml, INVOKE_GPUBOX_* variables and `--set`.

Every command Invoke runs goes through its `run.shell` (INVOKE_RUN_SHELL here): a recorder that logs the
command and, for the fact script only, answers as a Fedora 42 box would. So "no command ran" is what the
recorder saw, not what the code says. Each hostile case must exit 2 naming the key, the value and what is
allowed, run nothing and change no file; the property tests throw generated --set values and whole YAML
documents at the same entry point: every outcome is exit 0 (valid) or 2 (a named error), never a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
from invoke import Program

from provision import config
from testbed.testing import FEDORA42_OS, facts_stdout

ROOT = Path(__file__).resolve().parents[2]

RECORDER = r'''#!{python}
import json, os, sys
cmd = sys.argv[-1]
with open(os.environ["GPUBOX_TEST_RECORD"], "a") as f:
    f.write(json.dumps(cmd) + "\n")
if "@@fact" in cmd:
    sys.stdout.write(open(os.environ["GPUBOX_TEST_FACTS"]).read())
    sys.exit(0)
sys.exit(1)
'''

FACTS = {"user": "u 1000", "home": "/home/u", "os": FEDORA42_OS, "kernel": "6.14.0-63.fc42.x86_64",
         "glibc": "glibc 2.41", "dnf": "dnf5 version 5.2.13", "sudo": "yes", "cores": "8",
         "mem": "MemTotal: 32000000 kB\nMemAvailable: 30000000 kB", "systemd": "yes", "gpus": ("", 127)}


class Bench:
    """A directory with the collection module and its invoke.yaml, the recorder shell, and a clean HOME."""

    def __init__(self, root: Path):
        self.root = root
        self.proj = root / "proj"
        self.home = root / "home"
        self.reports = root / "reports"
        self.record = root / "commands.jsonl"
        for d in (self.proj, self.home):
            d.mkdir(parents=True, exist_ok=True)
        # The collection: tasks.py's namespace, loaded by Invoke from this directory, so this directory's
        # invoke.yaml is the project config file (read after the module is imported, as in real use).
        (self.proj / "gpubox_tasks.py").write_text("from tasks import ns  # noqa: F401\n")
        self.shell = root / "recorder"
        self.shell.write_text(RECORDER.format(python=sys.executable))
        self.shell.chmod(0o755)
        self.facts = root / "facts.txt"
        self.facts.write_text(facts_stdout(FACTS))

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "FABRIC_"))}
        return dict(keep, HOME=str(self.home), INVOKE_RUN_SHELL=str(self.shell), GPUBOX_TEST_RECORD=str(self.record),
                    GPUBOX_TEST_FACTS=str(self.facts), PYTHONPATH=str(ROOT), **extra)

    def snapshot(self) -> dict[str, tuple]:
        out = {}
        for p in sorted(self.root.rglob("*")):
            if p == self.record or "__pycache__" in p.parts:
                continue
            st_ = p.lstat()
            out[str(p)] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns)
        return out

    def invoke(self, monkeypatch, capsys, args: list[str], yaml_text: str | None = None,
               env: dict[str, str] | None = None, task: str = "plan") -> tuple[int, str, list[str]]:
        """`invoke -r <proj> -c gpubox_tasks <task> ARGS`, in this process. (exit code, stderr, commands)."""
        cfg = self.proj / "invoke.yaml"
        if yaml_text is None:
            cfg.unlink(missing_ok=True)
        elif not cfg.exists() or cfg.read_text() != yaml_text:
            cfg.write_text(yaml_text)
        self.record.unlink(missing_ok=True)
        for k in [k for k in os.environ if k.startswith(("INVOKE_", "FABRIC_"))]:
            monkeypatch.delenv(k)
        for k, v in self.env(env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = 0
        try:
            Program(binary="invoke").run(["invoke", "-r", str(self.proj), "-c", "gpubox_tasks", task, *args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        err = capsys.readouterr().err
        cmds = [json.loads(l) for l in self.record.read_text().splitlines()] if self.record.exists() else []
        return code, err, cmds


@pytest.fixture
def bench(tmp_path):
    return Bench(tmp_path)


NL = "\n"
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)) + "gpubox: {}\n"

# (id, channel, input, words that must appear: the key, the value, what is allowed)
# channel "set": --set KEY=VALUE; "yaml": the project's invoke.yaml; "env": {NAME: VALUE}.
HOSTILE = [
    ("null-list", "set", "driver.packages=null", ["gpubox.driver.packages", "None", "list of package names"]),
    ("null-path", "yaml", "gpubox:\n  state_dir: ~\n", ["gpubox.state_dir", "None", "absolute path"]),
    ("null-bool", "set", "build.cuda=~", ["gpubox.build.cuda", "None", "true or false"]),
    ("list-for-map", "set", "build.profiles=[1]", ["gpubox.build.profiles", "[1]", "must map profile names"]),
    ("rules-abs", "set", "patch.rules=/etc/passwd", ["gpubox.patch.rules", "'/etc/passwd'", "rule file in patches/"]),
    ("rules-dotdot", "set", "patch.rules=../pyproject.toml", ["gpubox.patch.rules", "'../pyproject.toml'", "no /"]),
    ("env-int", "env", {"INVOKE_GPUBOX_BUILD_JOBS": "abc"},
     ["gpubox.build.jobs", "'abc'", "INVOKE_GPUBOX_BUILD_JOBS", "integer between 0 and 1024"]),
    ("env-bool", "env", {"INVOKE_GPUBOX_MODELS_UPDATE": "perhaps"}, ["gpubox.models.update", "'perhaps'", "true or false"]),
    ("env-list", "env", {"INVOKE_GPUBOX_CUDA_PACKAGES": "cuda-nvcc-12-9; rm -rf /"},
     ["gpubox.cuda.packages", "'cuda-nvcc-12-9; rm -rf /'", "list of package names"]),
    ("env-unknown", "env", {"INVOKE_GPUBOX_BUILD_JBOS": "3"},
     ["INVOKE_GPUBOX_BUILD_JBOS", "no such gpubox setting", "did you mean INVOKE_GPUBOX_BUILD_JOBS"]),
    ("yaml-malformed", "yaml", "gpubox:\n  build: {jobs: [1\n", ["invoke.yaml", "is not a config file gpubox reads"]),
    ("yaml-not-mapping", "yaml", "gpubox: [1, 2]\n", ["gpubox = [1, 2]", "must be a mapping"]),
    ("yaml-top-list", "yaml", "- 1\n- 2\n", ["invoke.yaml", "must hold a mapping at its top"]),
    ("set-unknown", "set", "build.jbos=3", ["'jbos'", "did you mean build.jobs"]),
    ("yaml-unknown", "yaml", "gpubox:\n  stat_dir: /x\n", ["gpubox.stat_dir", "'/x'", "did you mean state_dir"]),
    ("no-equals", "set", "build.jobs", ["'build.jobs'", "expected KEY=VALUE"]),
    ("trailing-newline", "set", "state_dir=/srv/gpubox\n", ["gpubox.state_dir", r"'/srv/gpubox\n'", "control character"]),
    ("nul", "yaml", 'gpubox:\n  models:\n    dir: "/srv/m\\0x"\n', ["gpubox.models.dir", r"\x00", "control character"]),
    ("unit-injection", "set", "models.files.model.filename=x\n[Service]\nExecStartPre=touch /tmp/pwned\n.gguf",
     ["gpubox.models.files.model.filename", r"x\n[Service]", "control character"]),
    ("choice-newline", "set", "serve.cache_type_k=turbo3\n", ["gpubox.serve.cache_type_k", r"'turbo3\n'", "control character"]),
    ("shims-in-usr-bin", "set", "compiler.shim_dir=/usr/bin", ["gpubox.compiler.shim_dir", "'/usr/bin'", "not a system directory"]),
    ("snippet-passwd", "set", "cuda.profile_snippet=/etc/passwd", ["gpubox.cuda.profile_snippet", "'/etc/passwd'", ".sh file in /etc/profile.d"]),
    ("snippet-dotdot", "set", "cuda.profile_snippet=/etc/profile.d/../bashrc.sh", ["gpubox.cuda.profile_snippet", "not normalized"]),
    ("state-root", "set", "state_dir=/", ["gpubox.state_dir", "'/'", "/ is a system directory"]),
    ("state-etc", "env", {"INVOKE_GPUBOX_STATE_DIR": "/etc/gpubox"}, ["gpubox.state_dir", "'/etc/gpubox'", "inside the system's /etc"]),
    ("state-relative", "env", {"INVOKE_GPUBOX_STATE_DIR": "var/lib/gpubox"}, ["gpubox.state_dir", "'var/lib/gpubox'", "it is relative"]),
    ("state-quote", "set", "state_dir=/srv/o'brien", ["gpubox.state_dir", "without quotes"]),
    ("header-empty", "set", "patch.header=", ["gpubox.patch.header", "''", ".h path relative to cuda.prefix"]),
    ("header-escape", "set", "patch.header=../../../etc/shadow", ["gpubox.patch.header", "no . or .."]),
    ("git-ext", "set", "build.repo_url=ext::sh -c touch% /tmp/pwned", ["gpubox.build.repo_url", "ext::", "no ext::"]),
    ("git-option", "set", "build.repo_url=--upload-pack=touch /tmp/pwned", ["gpubox.build.repo_url", "'--upload-pack"]),
    ("alias-bomb", "yaml", BOMB, ["invoke.yaml", "aliases expand to more than"]),
    ("deep-nesting", "yaml", "gpubox: " + "[" * 100 + "]" * 100 + "\n", ["invoke.yaml", "nests deeper than"]),
    ("huge-file", "yaml", "#" * (2 << 20) + "\ngpubox: {}\n", ["invoke.yaml", "larger than"]),
    ("timeout-1e20", "set", "serve.ready_timeout=100000000000000000000",
     ["gpubox.serve.ready_timeout", "100000000000000000000", "between 1 and 86400"]),
    ("float-for-int", "set", "build.jobs=1.5e+3", ["gpubox.build.jobs", "1500.0", "integer between 0 and 1024"]),
    ("bool-for-int", "yaml", "gpubox: {build: {jobs: true}}\n", ["gpubox.build.jobs", "True", "integer"]),
    ("exposed-no-key", "set", "serve.host=0.0.0.0", ["gpubox.serve.host", "'0.0.0.0'", "serve.api_key_file"]),
    ("port-zero", "set", "serve.port=0", ["gpubox.serve.port", "0", "between 1 and 65535"]),
    ("sha-upper", "set", "models.files.model.sha256=" + "A" * 64, ["gpubox.models.files.model.sha256", "A" * 64, "64 lowercase hex"]),
    ("pkg-injection", "set", "driver.packages=['akmod-nvidia; reboot']", ["gpubox.driver.packages[0]", "'akmod-nvidia; reboot'", "package name"]),
    ("repo-traversal", "set", "models.files.model.repo=../../etc", ["gpubox.models.files.model.repo", "'../../etc'", "repo id"]),
    ("user-injection", "set", "user=root;id", ["gpubox.user", "'root;id'", "login name"]),
    ("targets-empty", "set", "build.targets=[]", ["gpubox.build.targets", "[]", "non-empty list"]),
    ("cmake-flag", "set", "build.cmake_extra=[-DX]", ["gpubox.build.cmake_extra[0]", "'-DX'", "NAME=VALUE"]),
    ("override-comma", "set", "serve.override_tensor=['a=CUDA0,b=CPU']", ["gpubox.serve.override_tensor[0]", "PATTERN=BUFFER"]),
    ("verbosity", "set", "serve.log_verbosity=9", ["gpubox.serve.log_verbosity", "9", '"auto" or an integer between 0 and 5']),
    ("report-in-etc", "set", "report_dir=/etc/gpubox-reports", ["gpubox.report_dir", "'/etc/gpubox-reports'", "not a system directory"]),
    ("new-entry-incomplete", "set", "models.files.extra.repo=org/name", ["gpubox.models.files.extra.filename", "is missing"]),
    ("map-key", "yaml", "gpubox: {build: {profiles: {'Bad Name': {sha: x}}}}\n", ["gpubox.build.profiles", "'Bad Name'", "a-z 0-9"]),
    ("duplicate-file", "set", "models.files.assistant.filename=gemma-4-26B-A4B-it-Q4_K_M.gguf",
     ["gpubox.models.files.assistant.filename", "same file"]),
    ("steps-reordered", "set", "steps=[models, driver]", ["gpubox.steps", "is fixed"]),
]


def test_the_table_is_big_enough():
    assert len(HOSTILE) >= 30 and len({h[0] for h in HOSTILE}) == len(HOSTILE)
    assert {h[1] for h in HOSTILE} == {"set", "yaml", "env"}


@pytest.mark.parametrize("name,channel,value,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_exits_2_names_it_and_runs_nothing(bench, monkeypatch, capsys, name, channel, value, words):
    args, yaml_text, env = [], None, {}
    if channel == "set":
        args = ["--set", value]
    elif channel == "yaml":
        yaml_text = value
    else:
        env = value
    if channel == "yaml":
        (bench.proj / "invoke.yaml").write_text(yaml_text)
    before = bench.snapshot()
    # (no report_dir override: had the value been accepted, the report would land under the bench's HOME)
    code, err, cmds = bench.invoke(monkeypatch, capsys, args, yaml_text=yaml_text, env=env)
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err
    assert cmds == []                                   # the recorder shell was never started
    assert bench.snapshot() == before                   # no file created, changed or removed
    assert not bench.reports.exists() and not (bench.home / ".cache").exists()


def test_the_same_entry_point_runs_a_valid_plan(bench, monkeypatch, capsys):
    """The bench is not refusing everything: a valid run gathers facts (one command) and exits 0."""
    code, err, cmds = bench.invoke(monkeypatch, capsys, ["--set", f"report_dir={bench.reports}"],
                                   yaml_text="gpubox:\n  state_dir: ~/.gpubox-state\n  build:\n    jobs: 3\n",
                                   env={"INVOKE_GPUBOX_BUILD_CUDA": "false"})
    assert code == 0, err
    assert len(cmds) == 1 and "@@fact" in cmds[0]
    rep = json.loads((bench.reports / "localhost-latest.json").read_text())
    assert rep["mode"] == "plan" and [s["name"] for s in rep["steps"]][0] == "driver"
    # ~/ was resolved against the target user's home from the facts, in what the steps reported
    models = next(s for s in rep["steps"] if s["name"] == "models")
    assert models["info"]["lock"] == "/home/u/.gpubox-state/gpubox.lock.json"
    assert not (bench.home / ".gpubox-state").exists() and not Path("~").exists()


# --- property tests ------------------------------------------------------------------------------------

def _leaf_keys():
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, prefix + k + ".")
            else:
                yield prefix + k
    return sorted(k for k in walk(config.defaults()["gpubox"]) if k != "report_dir")


KEYS = _leaf_keys()
HOSTILE_TEXT = ["", "~", "~/x", "/", "/usr/bin", "null", "true", "no", "on", "0", "-1", "1e20", "1.5", "[]", "{}",
                "[a, b]", "{a: 1}", "'quoted'", "\"x\\ny\"", "a\nb", "x\x00y", "%h", "$HOME", "`id`", "$(id)",
                "; rm -rf /", "../..", "\u2028", "\ud800", "\t", " /srv/x ", "&a [*a]", "*undefined", "!!python/object:os.system",
                "9" * 5000, "x" * 5000]
scalar = st.one_of(st.integers(min_value=-(10 ** 30), max_value=10 ** 30), st.booleans(), st.none(),
                   st.floats(allow_nan=True), st.text(max_size=40), st.sampled_from(HOSTILE_TEXT))
value_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=60),
                       st.integers().map(str), scalar.map(lambda v: yaml.safe_dump(v).strip()))
def _field(key: str):
    from provision import schema
    *head, name = key.split(".")
    model = schema._bare(schema.model_at(tuple(head))) if head else schema.Gpubox
    return model.model_fields[name] if schema.is_model(model) and name in model.model_fields else None


# Path components that are valid but unusual: spaces, %, $, shell and systemd specials, non-ASCII.
component = st.text(alphabet=st.sampled_from(list("abz09 %$;&|<>()*?[]{}=+#!~@^,:-_.é中\u00e9")), min_size=1,
                    max_size=12).filter(lambda c: c not in (".", "..") and c == c.strip())


def valid_value(key: str):
    """Values the schema accepts (mostly), so plan's checks see hostile-but-valid settings."""
    import annotated_types as at
    f = _field(key)
    d = config.defaults()["gpubox"]
    for part in key.split("."):
        d = d[part]
    if isinstance(d, bool):
        return st.sampled_from(["true", "false", "yes", "no", "on", "off"])
    if isinstance(d, int) and f is not None:
        lo = next((m.ge for m in f.metadata if isinstance(m, at.Ge)), 0)
        hi = next((m.le for m in f.metadata if isinstance(m, at.Le)), 10)
        return st.integers(min_value=lo, max_value=hi).map(str)
    if tuple(key.split(".")) in config.TARGET_PATHS and key not in ("cuda.profile_snippet",):
        quote_ok = key != "state_dir"
        return st.lists(component.filter(lambda c: quote_ok or "'" not in c), min_size=1, max_size=3).map(
            lambda cs: "/srv/" + "/".join(cs))
    return st.just(d if isinstance(d, str) else yaml.safe_dump(d, default_flow_style=True).strip())


valid_item = st.sampled_from(KEYS).flatmap(lambda k: valid_value(k).map(lambda v: f"{k}={v}"))
set_item = st.one_of(
    valid_item, valid_item,
    st.tuples(st.sampled_from(KEYS), value_text).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=40),                                                   # anything at all
    st.tuples(st.sampled_from(KEYS), st.text(max_size=8)).map(lambda kv: f"{kv[0]}{kv[1]}=1"),
)
PROP = settings(max_examples=int(os.environ.get("GPUBOX_HYPOTHESIS_EXAMPLES", "80")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _outcome_ok(code: int, err: str) -> None:
    event(f"exit {code}")
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.strip(), "exit 2 must say why"


@PROP
@given(items=st.lists(set_item, max_size=4))
def test_any_set_values_exit_0_or_2(bench, monkeypatch, capsys, items):
    args = [a for item in items for a in ("--set", item)]
    code, err, cmds = bench.invoke(monkeypatch, capsys, [*args, "--set", f"report_dir={bench.reports}"])
    _outcome_ok(code, err)
    if code == 2:
        assert cmds == []


def _nested(keys):
    """A gpubox mapping with some real keys (dotted paths) set to generated values."""
    def build(pairs):
        out: dict = {}
        for k, v in pairs:
            node = out
            parts = k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
            if isinstance(node, dict):
                node[parts[-1]] = v
        return out
    leaf = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=6)
    return st.lists(st.tuples(st.sampled_from(keys + ["stat_dir", "build.jbos", "serve"]), leaf), max_size=5).map(build)


document = st.one_of(
    _nested(KEYS).map(lambda g: yaml.safe_dump({"gpubox": g}, allow_unicode=True)),
    st.text(max_size=200),                                                  # not even YAML, maybe
    st.lists(st.sampled_from(["gpubox:", "  build:", "    jobs: 4", "  - x", "a: &a [1]", "b: *a", "  state_dir: ~",
                              "gpubox: [", "\t", "gpubox: {serve: {port: 80}}", "%YAML 1.1", "---", "..."]),
             max_size=8).map("\n".join),
)


@PROP
@given(doc=document)
def test_any_invoke_yaml_exits_0_or_2(bench, monkeypatch, capsys, doc):
    code, err, cmds = bench.invoke(monkeypatch, capsys, ["--set", f"report_dir={bench.reports}"], yaml_text=doc)
    _outcome_ok(code, err)
    if code == 2:
        assert cmds == []
