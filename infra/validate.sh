#!/usr/bin/env bash
# shellcheck disable=SC2329  # the check_* functions are called indirectly, through run_check
# Lint the container image definition and the cloud infrastructure, offline.
#
#   bash infra/validate.sh --install   # set-up step (`make tools`): create/update the validators' venv
#   bash infra/validate.sh             # from anywhere; exit 0 only if every check passes
#   TOOLS_VENV=/path bash infra/validate.sh
#
# The validators live in their own virtualenv (default: .venv-tools at the repository root),
# pinned by infra/requirements-tools.txt and rebuilt only when that file changes (a stamp
# holds its sha256). The IAM policy evaluator the tests use (@cloud-copilot/iam-simulate, npm,
# pinned with integrity hashes by infra/iam/package-lock.json) goes into $TOOLS_VENV/iam with
# `npm ci`, under the same stamp; it needs the machine's Node.js (>= 18) and npm. Only --install uses the package index (`make tools`, which `make test`
# and `make infra-validate` run first); the checks themselves never touch the network: without
# an up-to-date venv they stop and say so (checkov runs with --skip-download; the others bundle
# their schemas). tests/test_infra.py reads cfn-lint's region data from the same venv.
#
# Checks:
#   hadolint             Dockerfile, failing on warnings (ignores are justified inline)
#   shell scripts        docker/entrypoint.sh and this file, with shellcheck
#   yamllint             every YAML file here (relaxed rules, 120 columns, warnings fail)
#   cfn-lint             infra/aws/template.yaml, warnings fail too
#   kubernetes-validate  infra/k8s/*.yaml, --strict, against the oldest and newest supported
#                        Kubernetes; "couldn't find schema" (unknown apiVersion) fails
#   checkov              Dockerfile, template, manifests, secrets scan; skips are inline
#                        with their reason, and listed in the summary
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TOOLS_VENV=${TOOLS_VENV:-$ROOT/.venv-tools}
REQUIREMENTS=infra/requirements-tools.txt
IAM_LOCK=(infra/iam/package.json infra/iam/package-lock.json)
K8S_VERSIONS=${K8S_VERSIONS:-"1.29.0 1.37.0"}   # oldest with podReplacementPolicy, newest bundled

DOCKERFILE=Dockerfile
CFN_TEMPLATE=infra/aws/template.yaml
K8S_MANIFESTS=(infra/k8s/*.yaml)
SHELL_SCRIPTS=(docker/entrypoint.sh infra/validate.sh)
YAML_FILES=("$CFN_TEMPLATE" "${K8S_MANIFESTS[@]}")

log() { printf '%s\n' "$*" >&2; }

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3; do
        if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    log "validate: no Python >= 3.10 found (set PYTHON=...)"
    return 1
}

# One hash for everything the venv is built from: a change to either pin set rebuilds it.
tools_hash() {
    cat "$REQUIREMENTS" "${IAM_LOCK[@]}" | sha256sum | cut -d' ' -f1
}

tools_current() {
    local want have stamp="$TOOLS_VENV/.requirements.sha256"
    want=$(tools_hash)
    have=$(cat "$stamp" 2>/dev/null || true)
    [[ -x $TOOLS_VENV/bin/python && -d $TOOLS_VENV/iam/node_modules && $want == "$have" ]]
}

install_tools() {
    local want python stamp="$TOOLS_VENV/.requirements.sha256"
    if tools_current; then
        log "validate: $TOOLS_VENV is up to date with $REQUIREMENTS"
        return 0
    fi
    want=$(tools_hash)
    python=$(pick_python)
    log "validate: installing the validators into $TOOLS_VENV (once per change of $REQUIREMENTS)"
    rm -f "$stamp"
    "$python" -m venv "$TOOLS_VENV"
    # uv installs the pinned set in seconds (pip: ~30 s of CPU beside the job's own set-up in CI); no .pyc
    # at install: each validator runs once a test run, and compiling the set costs more than that.
    "$TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check uv
    "$TOOLS_VENV/bin/uv" pip install --quiet --python "$TOOLS_VENV/bin/python" -r "$REQUIREMENTS"
    if ! command -v npm >/dev/null 2>&1; then
        log "validate: npm (Node.js >= 18) is needed for the IAM policy evaluator the tests use"
        return 1
    fi
    mkdir -p "$TOOLS_VENV/iam"
    cp "${IAM_LOCK[@]}" "$TOOLS_VENV/iam/"
    # ci: exactly the lock, integrity-checked; no install scripts run.
    npm ci --prefix "$TOOLS_VENV/iam" --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
    printf '%s\n' "$want" >"$stamp"
}

if [[ ${1:-} == --install ]]; then
    install_tools
    exit 0
fi
if ! tools_current; then
    log "validate: the validators in $TOOLS_VENV are missing or older than $REQUIREMENTS;" \
        "run \`make tools\` (or bash infra/validate.sh --install) once, with the package index reachable."
    exit 2
fi
BIN=$TOOLS_VENV/bin
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# Each check writes its output to $OUT/<name>.log and its status to $OUT/<name>.rc.
run_check() {
    local name=$1
    shift
    local start=$SECONDS rc=0
    "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    printf '%s %s\n' "$rc" "$((SECONDS - start))" >"$OUT/$name.rc"
}

check_hadolint() {
    "$BIN/hadolint" --failure-threshold warning "$DOCKERFILE"
}

check_shellcheck() {
    "$BIN/shellcheck" --severity=style "${SHELL_SCRIPTS[@]}"
}

check_yamllint() {
    "$BIN/yamllint" --strict -d '{extends: relaxed, rules: {line-length: {max: 120}}}' "${YAML_FILES[@]}"
}

check_cfn_lint() {
    # Any finding (error 2, warning 4, info 8) fails; the exit code is a bit mask.
    "$BIN/cfn-lint" --regions us-east-1 eu-west-1 -- "$CFN_TEMPLATE"
}

check_kubernetes_validate() {
    local version rc=0
    for version in $K8S_VERSIONS; do
        "$BIN/kubernetes-validate" --strict --quiet -k "$version" "${K8S_MANIFESTS[@]}" ||
            rc=1
    done
    return "$rc"
}

check_checkov() {
    local files=("$DOCKERFILE" "$CFN_TEMPLATE" "${K8S_MANIFESTS[@]}")
    "$BIN/checkov" --skip-download --quiet --compact \
        --framework dockerfile cloudformation kubernetes secrets -f "${files[@]}"
}

# kubernetes-validate only WARNs (exit 0) for an apiVersion it has no schema for: fail on it.
post_kubernetes_validate() {
    if grep -Eiq "couldn't find schema|WARN" "$OUT/kubernetes-validate.log"; then
        echo "unknown apiVersion/kind (no schema) - treated as a failure" >>"$OUT/kubernetes-validate.log"
        printf '1 %s\n' "$(cut -d' ' -f2 "$OUT/kubernetes-validate.rc")" >"$OUT/kubernetes-validate.rc"
    fi
}

CHECKS=(hadolint shellcheck yamllint cfn-lint kubernetes-validate checkov)
started=$SECONDS
# checkov dominates the run time: start it first, run the quick checks meanwhile.
run_check checkov check_checkov &
checkov_pid=$!
run_check hadolint check_hadolint
run_check shellcheck check_shellcheck
run_check yamllint check_yamllint
run_check cfn-lint check_cfn_lint
run_check kubernetes-validate check_kubernetes_validate
post_kubernetes_validate
wait "$checkov_pid"

failed=0
printf '\n%-22s %-6s %s\n' "check" "result" "seconds"
for name in "${CHECKS[@]}"; do
    read -r rc secs <"$OUT/$name.rc"
    if [[ $rc == 0 ]]; then
        printf '%-22s %-6s %s\n' "$name" "ok" "$secs"
    else
        printf '%-22s %-6s %s\n' "$name" "FAIL" "$secs"
        failed=1
    fi
done

skips=$(grep -EHo "shellcheck disable=SC[0-9]+|hadolint ignore=DL[0-9]+|checkov:skip=CKV2?_[A-Z0-9]+_[0-9]+|CKV2?_[A-Z0-9]+_[0-9]+=|id: CKV2?_[A-Z0-9]+_[0-9]+" \
    "$DOCKERFILE" "$CFN_TEMPLATE" "${K8S_MANIFESTS[@]}" "${SHELL_SCRIPTS[@]}" |
    sed -E 's/(shellcheck disable=|hadolint ignore=|checkov:skip=|id: )//; s/=$//; s/:/  /; s/^/  /' || true)
if [[ -n $skips ]]; then
    printf '\nsuppressions (each carries its reason inline):\n%s\n' "$skips"
fi

for name in "${CHECKS[@]}"; do
    read -r rc _ <"$OUT/$name.rc"
    if [[ $rc != 0 ]]; then
        printf '\n===== %s (exit %s) =====\n' "$name" "$rc"
        cat "$OUT/$name.log"
    fi
done

printf '\nvalidate: %s in %ss\n' "$([[ $failed == 0 ]] && echo "all checks passed" || echo "FAILED")" \
    "$((SECONDS - started))"
exit "$failed"
