#!/usr/bin/env bash
# Checks deploy/ without a cluster or a Docker engine (for CI: `bash deploy/check.sh`).
#
#   bash deploy/check.sh [DEPLOY_DIR]    # default: the directory of this script
#
# 1. Every manifest in kubernetes/ (except kustomization.yaml, which is not a
#    Kubernetes API object, and servicemonitor.yaml, a Prometheus Operator
#    custom resource kubernetes-validate has no schema for: it only warns and
#    passes it, so its shape is checked in step 2 instead) against the Kubernetes OpenAPI schemas of
#    $K8S_VERSION with kubernetes-validate --strict (PyPI; it bundles the
#    schemas, so it works offline once installed). Unknown fields fail.
# 2. By parsing the YAML (PyYAML):
#    - kustomization.yaml lists every manifest in kubernetes/ except
#      secrets.example.yaml (applied by hand; it must not be listed);
#    - every container of every pod sets the Pod Security "restricted" fields
#      (runAsNonRoot, numeric runAsUser/runAsGroup, allowPrivilegeEscalation:
#      false, readOnlyRootFilesystem: true, capabilities drop ALL, seccomp
#      RuntimeDefault), cpu/memory requests and limits, liveness and readiness
#      probes, and no host namespaces, hostPath or privileged mode;
#    - the control plane's CLAW_HEARTBEAT_PROXY names the proxy Service and one
#      of its ports, and that port leads to the proxy's listen port; its data
#      dir is on its PersistentVolumeClaim; liveness on /healthz;
#    - the proxy's snapshot cache (CLAW_DP_SNAPSHOT_CACHE) is on an emptyDir,
#      it has a preStop hook the image can run, readiness on /readyz, liveness
#      on /healthz, and terminationGracePeriodSeconds above preStop +
#      drain delay + drain timeout; --metrics-addr is set, its port is a
#      containerPort named `metrics` (and the prometheus.io/port annotation);
#    - servicemonitor.yaml (not in kustomization.yaml: it needs the operator's
#      CRDs) is a monitoring.coreos.com/v1 ServiceMonitor of known fields whose
#      selector picks a Service with its endpoint port, which leads to the
#      proxies' metrics port;
#    - compose.yaml parses and its control plane's CLAW_HEARTBEAT_PROXY is a
#      proxy service's listen address; each proxy sets CLAW_DP_METRICS_ADDR
#      and CLAW_DP_DRAIN_DELAY, and stop_grace_period is above delay + drain;
#    - the Dockerfile's dependency layer copies every workspace member's
#      Cargo.toml and stubs every target cargo will look for; its user is the
#      numeric uid:gid the manifests run as;
#    - the repository root has a .dockerignore keeping out target/, .git and
#      .quickstart/.
# Exits non-zero with one line per problem.
set -euo pipefail

DEPLOY_DIR="$(cd "${1:-$(dirname "$0")}" && pwd)"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
KV_PIN="kubernetes-validate==1.37.0"
YAML_PIN="PyYAML==6.0.2"

# Tools: a virtualenv under the CI cache when python3 can make one (Debian
# needs python3-venv; PEP 668 forbids a system-wide pip install), else the
# same `pip install` .ci/run already uses.
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/claw-ci/deploy-check-${KV_PIN#*==}"
PY=python3
if [ -x "$CACHE/bin/python" ] || python3 -m venv "$CACHE" >/dev/null 2>&1; then
  PY="$CACHE/bin/python"
fi
if ! "$PY" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$KV_PIN" "$YAML_PIN" \
    || { echo "deploy/check.sh: FAIL: could not install $KV_PIN $YAML_PIN with pip" >&2; exit 1; }
fi

status=0
manifests=()
for f in "$DEPLOY_DIR"/kubernetes/*.yaml; do
  case "$(basename "$f")" in
    kustomization.yaml | servicemonitor.yaml) ;;  # not core API objects (see above)
    *) manifests+=("$f") ;;
  esac
done
echo "== schema validation (kubernetes-validate --strict, Kubernetes $K8S_VERSION)"
if ! "$PY" -m kubernetes_validate --strict --kubernetes-version "$K8S_VERSION" "${manifests[@]}"; then
  echo "deploy/check.sh: FAIL: a manifest does not match the Kubernetes $K8S_VERSION schemas (above)" >&2
  status=1
fi

echo "== manifest contents"
"$PY" - "$DEPLOY_DIR" <<'PY' || status=1
import glob, os, re, sys, tomllib
from urllib.parse import urlparse
import yaml

deploy = sys.argv[1]
root = os.path.dirname(deploy)
kdir = os.path.join(deploy, "kubernetes")
problems = []
def fail(msg): problems.append(msg)

def load(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        fail(f"{os.path.relpath(path, root)}: cannot parse: {e}")
        return []

# --- kustomization -----------------------------------------------------------
files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(kdir, "*.yaml")))
HAND_APPLIED = {"secrets.example.yaml"}
# Custom resources: applied by hand (or from an overlay) where the CRDs exist;
# `kubectl apply -k` would fail without them.
NEEDS_CRDS = {"servicemonitor.yaml"}
kpath = os.path.join(kdir, "kustomization.yaml")
if not os.path.exists(kpath):
    fail("kubernetes/kustomization.yaml is missing (`kubectl apply -k deploy/kubernetes`)")
else:
    docs = load(kpath)
    k = docs[0] if docs else {}
    if k.get("kind") != "Kustomization":
        fail("kubernetes/kustomization.yaml: kind is not Kustomization")
    listed = list(k.get("resources") or [])
    for r in listed:
        if not os.path.exists(os.path.join(kdir, r)):
            fail(f"kustomization.yaml lists {r}, which does not exist")
    for f in files:
        if f == "kustomization.yaml":
            continue
        if f in HAND_APPLIED:
            if f in listed:
                fail(f"kustomization.yaml lists {f}: it holds placeholder secrets and is applied by hand")
        elif f in NEEDS_CRDS:
            if f in listed:
                fail(f"kustomization.yaml lists {f}: it needs the Prometheus Operator CRDs, so `kubectl apply -k` would fail without them")
        elif f not in listed:
            fail(f"kustomization.yaml does not list kubernetes/{f}")

objects = []  # (file, doc)
for f in files:
    if f != "kustomization.yaml":
        objects += [(f, d) for d in load(os.path.join(kdir, f))]

# --- helpers -----------------------------------------------------------------
def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    return None

def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env") or [] if "name" in e}

def flag(c, name):
    args = list(c.get("command") or []) + list(c.get("args") or [])
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None

def setting(c, flag_name, env_name):
    return flag(c, flag_name) or env_of(c).get(env_name)

def role(c):
    cmd = " ".join(c.get("command") or [])
    if "claw-data-plane" in cmd:
        return "proxy"
    if "clawctl" in cmd:
        return "clawctl"
    if not cmd or "claw-control-plane" in cmd:  # the image's entrypoint
        return "control-plane"
    return "other"

def seconds(d):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(d or "").strip())
    if not m:
        return None
    n = int(m.group(1))
    return {"ms": n / 1000, "s": n, None: n, "m": n * 60, "h": n * 3600}[m.group(2)]

def mount_for(c, path):
    """The volumeMount whose mountPath holds `path` (longest match)."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best

# --- Pod Security "restricted" and resources, every container -----------------
pods = []  # (file, doc, spec)
for f, d in objects:
    spec = pod_spec(d)
    if spec is not None:
        pods.append((f, d, spec))
if not pods:
    fail("no pod templates found in kubernetes/")

for f, d, spec in pods:
    where = f"{f}: {d['kind']}/{d.get('metadata', {}).get('name')}"
    psc = spec.get("securityContext") or {}
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            fail(f"{where}: {k} is not allowed under restricted")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            fail(f"{where}: volume {v.get('name')} is a hostPath")
    containers = [("container", c) for c in spec.get("containers") or []] + \
                 [("initContainer", c) for c in spec.get("initContainers") or []]
    for kind, c in containers:
        cw = f"{where} {kind} {c.get('name')}"
        sc = c.get("securityContext") or {}
        eff = lambda k: sc.get(k, psc.get(k))
        if eff("runAsNonRoot") is not True:
            fail(f"{cw}: runAsNonRoot is not true")
        for k in ("runAsUser", "runAsGroup"):
            v = eff(k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"{cw}: {k} is not a numeric non-root id (got {v!r})")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{cw}: securityContext.allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            fail(f"{cw}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{cw}: securityContext.readOnlyRootFilesystem is not true")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            fail(f"{cw}: securityContext.capabilities.drop does not contain ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            fail(f"{cw}: adds capabilities {caps.get('add')}")
        seccomp = (eff("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            fail(f"{cw}: seccompProfile.type is not RuntimeDefault (got {seccomp!r})")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    fail(f"{cw}: no resources.{part}.{r}")
        if kind == "container":
            for p in ("readinessProbe", "livenessProbe"):
                if p not in c:
                    fail(f"{cw}: no {p}")

# --- roles: the control plane and the proxies ---------------------------------
def containers_of(role_name):
    out = []
    for f, d, spec in pods:
        for c in spec.get("containers") or []:
            if role(c) == role_name:
                out.append((f, d, spec, c))
    return out

def http_path(probe):
    return ((probe or {}).get("httpGet") or {}).get("path")

def volume(spec, name):
    for v in spec.get("volumes") or []:
        if v.get("name") == name:
            return v
    return None

cps, proxies = containers_of("control-plane"), containers_of("proxy")
if len(cps) != 1:
    fail(f"expected one control-plane container in kubernetes/, found {len(cps)}")
if not proxies:
    fail("no proxy (claw-data-plane) container in kubernetes/")

services = [d for _, d in objects if d.get("kind") == "Service"]

def port_num(c, p):
    """containerPort of a named or numbered port of container c."""
    for cp in c.get("ports") or []:
        if p == cp.get("name") or p == cp.get("containerPort"):
            return cp.get("containerPort")
    return p if isinstance(p, int) else None

proxy_metrics = []  # (deployment, container, metrics port)
for f, d, spec, c in proxies:
    w = f"{f}: proxy container {c.get('name')}"
    if http_path(c.get("readinessProbe")) != "/readyz":
        fail(f"{w}: readinessProbe is not httpGet /readyz")
    if http_path(c.get("livenessProbe")) != "/healthz":
        fail(f"{w}: livenessProbe is not httpGet /healthz")
    cache = setting(c, "--snapshot-cache", "CLAW_DP_SNAPSHOT_CACHE")
    if not cache:
        fail(f"{w}: no snapshot cache (CLAW_DP_SNAPSHOT_CACHE): a restarted container waits for the control plane")
    else:
        m = mount_for(c, cache)
        v = volume(spec, m["name"]) if m else None
        if not v or "emptyDir" not in v:
            fail(f"{w}: snapshot cache {cache} is not on an emptyDir volume")
    pre = ((c.get("lifecycle") or {}).get("preStop")) or {}
    pre_s = 0
    if "sleep" in pre:
        pre_s = int(pre["sleep"].get("seconds", 0))
    elif "exec" in pre:
        cmd = pre["exec"].get("command") or []
        if cmd and os.path.basename(cmd[0]) == "sleep" and len(cmd) > 1:
            pre_s = seconds(cmd[1]) or 0
        elif cmd:
            pre_s = 0
    if not pre:
        fail(f"{w}: no preStop hook (SIGTERM closes the listener while the endpoint is still routed to)")
    drain = seconds(setting(c, "--drain-timeout", "CLAW_DP_DRAIN_TIMEOUT") or "30s") or 0
    delay_setting = setting(c, "--drain-delay", "CLAW_DP_DRAIN_DELAY")
    delay = seconds(delay_setting or "5s")
    if delay is None:
        fail(f"{w}: --drain-delay {delay_setting!r} is not a duration like 5s")
        delay = 0
    elif delay == 0:
        fail(f"{w}: --drain-delay is 0: SIGTERM would stop accepting while load balancers still route to the pod")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_s + delay + drain:
        fail(f"{w}: terminationGracePeriodSeconds {grace} is not above preStop {pre_s}s + drain delay {delay}s + drain timeout {drain}s")
    maddr = setting(c, "--metrics-addr", "CLAW_DP_METRICS_ADDR")
    if not maddr:
        fail(f"{w}: no --metrics-addr: /metrics is served unauthenticated on the API port")
    else:
        mport = maddr.rsplit(":", 1)[-1]
        named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if str(named.get("metrics")) != mport:
            fail(f"{w}: --metrics-addr {maddr}: no containerPort named metrics with port {mport} (got {named.get('metrics')})")
        ann = ((d["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get("prometheus.io/port")
        if ann is not None and str(ann) != mport:
            fail(f"{w}: prometheus.io/port is {ann}, the metrics port is {mport}")
        proxy_metrics.append((d, c, mport))

for f, d, spec, c in cps:
    w = f"{f}: control-plane container {c.get('name')}"
    if http_path(c.get("livenessProbe")) != "/healthz":
        fail(f"{w}: livenessProbe is not httpGet /healthz")
    data = setting(c, "--data-dir", "CLAW_DATA_DIR") or "/var/lib/claw/data"
    m = mount_for(c, data)
    claims = [t.get("metadata", {}).get("name") for t in (d.get("spec") or {}).get("volumeClaimTemplates") or []]
    v = volume(spec, m["name"]) if m else None
    on_pvc = m and (m["name"] in claims or (v and "persistentVolumeClaim" in v))
    if not on_pvc:
        fail(f"{w}: data dir {data} is not on a PersistentVolumeClaim")
    hb = setting(c, "--heartbeat-proxy", "CLAW_HEARTBEAT_PROXY")
    if not hb:
        fail(f"{w}: CLAW_HEARTBEAT_PROXY is not set: heartbeat runs go to 127.0.0.1:8080, this pod itself")
        continue
    u = urlparse(hb)
    host = (u.hostname or "").split(".")[0]
    port = u.port or (443 if u.scheme == "https" else 80)
    svc = next((s for s in services if s["metadata"]["name"] == host), None)
    if svc is None:
        fail(f"{w}: CLAW_HEARTBEAT_PROXY {hb}: no Service named {host!r} in kubernetes/")
        continue
    sel = (svc.get("spec") or {}).get("selector") or {}
    backing = [(pf, pd, ps, pc) for pf, pd, ps, pc in proxies
               if sel and all(((pd["spec"]["template"]["metadata"].get("labels") or {}).get(k)) == v
                              for k, v in sel.items())]
    if not backing:
        fail(f"{w}: CLAW_HEARTBEAT_PROXY {hb}: Service {host} does not select the proxy pods")
        continue
    sp = next((p for p in svc["spec"].get("ports") or [] if p.get("port") == port), None)
    if sp is None:
        fail(f"{w}: CLAW_HEARTBEAT_PROXY {hb}: Service {host} has no port {port}")
        continue
    pc = backing[0][3]
    target = port_num(pc, sp.get("targetPort", sp.get("port")))
    addr = setting(pc, "--addr", "CLAW_DP_ADDR") or "127.0.0.1:8080"
    if target is None or str(target) != addr.rsplit(":", 1)[-1]:
        fail(f"{w}: CLAW_HEARTBEAT_PROXY {hb}: Service port {port} targets {target}, the proxy listens on {addr}")

# --- ServiceMonitor (shape only: no schema for custom resources) -------------
def selects(sel, labels):
    return bool(sel) and all((labels or {}).get(k) == v for k, v in sel.items())

SM_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
           "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"}
SM_ENDPOINT = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
               "tlsConfig", "bearerTokenSecret", "authorization", "basicAuth", "honorLabels",
               "honorTimestamps", "relabelings", "metricRelabelings", "followRedirects",
               "enableHttp2", "proxyUrl", "oauth2", "filterRunning"}
monitors = [(f, d) for f, d in objects if d.get("kind") == "ServiceMonitor"]
if not monitors:
    fail("kubernetes/: no ServiceMonitor for the proxies' metrics port")
for f, d in monitors:
    w = f"{f}: ServiceMonitor/{(d.get('metadata') or {}).get('name')}"
    if f not in NEEDS_CRDS:
        fail(f"{w}: a custom resource outside {sorted(NEEDS_CRDS)} would go to kubernetes-validate and `kubectl apply -k`")
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(f"{w}: apiVersion is {d.get('apiVersion')!r}, not monitoring.coreos.com/v1")
    if set(d) - {"apiVersion", "kind", "metadata", "spec"}:
        fail(f"{w}: unknown top-level fields {sorted(set(d) - {'apiVersion', 'kind', 'metadata', 'spec'})}")
    if not (d.get("metadata") or {}).get("name"):
        fail(f"{w}: no metadata.name")
    sm = d.get("spec") or {}
    if set(sm) - SM_SPEC:
        fail(f"{w}: unknown spec fields {sorted(set(sm) - SM_SPEC)}")
    sel = (sm.get("selector") or {}).get("matchLabels") or {}
    picked = [s for s in services if selects(sel, (s.get("metadata") or {}).get("labels"))]
    if not picked:
        fail(f"{w}: spec.selector.matchLabels {sel} selects no Service in kubernetes/")
    eps = sm.get("endpoints") or []
    if not eps:
        fail(f"{w}: no endpoints")
    for ep in eps:
        if set(ep) - SM_ENDPOINT:
            fail(f"{w}: unknown endpoint fields {sorted(set(ep) - SM_ENDPOINT)}")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and seconds(ep[k]) is None:
                fail(f"{w}: endpoint {k} {ep[k]!r} is not a duration")
        if not isinstance(ep.get("port"), str):
            fail(f"{w}: endpoint port must name a Service port (got {ep.get('port')!r})")
            continue
        for s in picked:
            sw = f"{w}: Service {s['metadata']['name']}"
            sp = next((p for p in (s.get("spec") or {}).get("ports") or [] if p.get("name") == ep["port"]), None)
            if sp is None:
                fail(f"{sw} has no port named {ep['port']!r}")
                continue
            ssel = (s.get("spec") or {}).get("selector") or {}
            behind = [(pd, pc, mp) for pd, pc, mp in proxy_metrics
                      if selects(ssel, pd["spec"]["template"]["metadata"].get("labels"))]
            if not behind:
                fail(f"{sw} does not select proxy pods with a metrics listener")
            for pd, pc, mp in behind:
                target = port_num(pc, sp.get("targetPort", sp.get("port")))
                if str(target) != mp:
                    fail(f"{sw} port {ep['port']} targets {target}, the proxy's --metrics-addr port is {mp}")

# --- compose.yaml --------------------------------------------------------------
cpath = os.path.join(deploy, "compose.yaml")
cdocs = load(cpath) if os.path.exists(cpath) else fail("compose.yaml is missing") or []
if cdocs:
    svcs = (cdocs[0] or {}).get("services") or {}
    def cenv(s):
        e = s.get("environment") or {}
        if isinstance(e, list):
            e = dict(x.split("=", 1) if "=" in x else (x, None) for x in e)
        return e
    def centry(s):
        e = s.get("entrypoint") or []
        return " ".join(e) if isinstance(e, list) else str(e)
    cp_svcs = [n for n, s in svcs.items() if "claw-data-plane" not in centry(s) and "clawctl" not in centry(s)]
    px_svcs = {n: s for n, s in svcs.items() if "claw-data-plane" in centry(s)}
    if not px_svcs:
        fail("compose.yaml: no proxy (claw-data-plane) service")
    for n, s in px_svcs.items():
        e = cenv(s)
        if not e.get("CLAW_DP_METRICS_ADDR"):
            fail(f"compose.yaml: proxy {n}: CLAW_DP_METRICS_ADDR is not set (/metrics stays on the API port)")
        delay = seconds(e.get("CLAW_DP_DRAIN_DELAY") or "5s")
        drain = seconds(e.get("CLAW_DP_DRAIN_TIMEOUT") or "30s")
        if "CLAW_DP_DRAIN_DELAY" not in e:
            fail(f"compose.yaml: proxy {n}: CLAW_DP_DRAIN_DELAY is not set")
        grace = seconds(s.get("stop_grace_period") or "10s")
        if None in (delay, drain, grace):
            fail(f"compose.yaml: proxy {n}: CLAW_DP_DRAIN_DELAY, CLAW_DP_DRAIN_TIMEOUT or stop_grace_period is not a duration")
        elif grace <= delay + drain:
            fail(f"compose.yaml: proxy {n}: stop_grace_period {grace}s is not above drain delay {delay}s + drain timeout {drain}s")
    for n in cp_svcs:
        hb = cenv(svcs[n]).get("CLAW_HEARTBEAT_PROXY")
        if not hb:
            fail(f"compose.yaml: service {n}: CLAW_HEARTBEAT_PROXY is not set (runs would go to its own 127.0.0.1:8080)")
            continue
        u = urlparse(hb)
        px = px_svcs.get(u.hostname)
        if px is None:
            fail(f"compose.yaml: service {n}: CLAW_HEARTBEAT_PROXY {hb} does not name a proxy service ({', '.join(px_svcs)})")
            continue
        addr = cenv(px).get("CLAW_DP_ADDR") or "127.0.0.1:8080"
        if addr.startswith("127.0.0.1") or str(u.port or 80) != addr.rsplit(":", 1)[-1]:
            fail(f"compose.yaml: service {n}: CLAW_HEARTBEAT_PROXY {hb} is not where {u.hostname} listens ({addr})")

# --- Dockerfile dependency layer and user --------------------------------------
dpath = os.path.join(deploy, "Dockerfile")
try:
    dockerfile = open(dpath).read()
except OSError:
    dockerfile = ""
    fail("Dockerfile is missing")
try:
    ws = tomllib.load(open(os.path.join(root, "Cargo.toml"), "rb"))
except (OSError, tomllib.TOMLDecodeError) as e:
    ws = {}
    fail(f"Cargo.toml: {e}")
members = (ws.get("workspace") or {}).get("members") or []
dep_layer = dockerfile.split("COPY . .")[0] if "COPY . ." in dockerfile else ""
if dockerfile and not re.search(r"^COPY\s.*Cargo\.lock", dep_layer, re.M):
    fail("Dockerfile: no dependency layer (Cargo.toml, Cargo.lock and stub sources built before `COPY . .`): every source change rebuilds every dependency")
elif members:
    for m in members:
        if not re.search(rf"COPY\s+{re.escape(m)}/Cargo\.toml\s", dep_layer):
            fail(f"Dockerfile: the dependency layer does not copy {m}/Cargo.toml (cargo cannot load the workspace)")
        mdir = os.path.join(root, m)
        man = tomllib.load(open(os.path.join(mdir, "Cargo.toml"), "rb"))
        pkg = man.get("package") or {}
        need = set()
        lib = man.get("lib") or {}
        if lib.get("path"):
            need.add(lib["path"])
        elif os.path.exists(os.path.join(mdir, "src/lib.rs")):
            need.add("src/lib.rs")
        for t in ("bin", "test", "bench", "example"):
            for tgt in man.get(t) or []:
                if tgt.get("path"):
                    need.add(tgt["path"])
        if os.path.exists(os.path.join(mdir, "src/main.rs")) and pkg.get("autobins", True):
            need.add("src/main.rs")
        if pkg.get("autobins", True):
            need |= {os.path.relpath(p, mdir) for p in glob.glob(os.path.join(mdir, "src/bin/*.rs"))}
        build = pkg.get("build", "build.rs" if os.path.exists(os.path.join(mdir, "build.rs")) else None)
        if build:
            need.add(build)
        for p in sorted(need):
            if f"{m}/{p}" not in dep_layer:
                fail(f"Dockerfile: the dependency layer has no stand-in for {m}/{p} (cargo will not load or build the stub workspace)")
    builds = re.findall(r"cargo build[^\n\\]*", dockerfile)
    if len(builds) >= 2 and len(set(b.strip() for b in builds)) != 1:
        fail(f"Dockerfile: the two cargo builds differ ({builds}); the cached dependencies would not be reused")

final_from = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
final_from = final_from[-1] if final_from else ""
user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
user = user[-1] if user else ""
if dockerfile and not re.fullmatch(r"\d+:\d+", user):
    fail(f"Dockerfile: USER {user!r} is not a numeric uid:gid (the manifests' runAsUser/runAsGroup must match the image)")
for f, d, spec in pods:
    psc = spec.get("securityContext") or {}
    for c in spec.get("containers") or []:
        sc = c.get("securityContext") or {}
        ids = f"{sc.get('runAsUser', psc.get('runAsUser'))}:{sc.get('runAsGroup', psc.get('runAsGroup'))}"
        if user and re.fullmatch(r"\d+:\d+", user) and ids != user:
            fail(f"{f}: container {c.get('name')} runs as {ids}, the image's user is {user}")
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec")
        if pre and re.search(r"distroless|scratch|static", final_from):
            fail(f"{f}: container {c.get('name')}: preStop exec {pre.get('command')} but the image ({final_from}) has no shell tools")

# --- .dockerignore ---------------------------------------------------------------
try:
    ignore = [l.strip() for l in open(os.path.join(root, ".dockerignore")) if l.strip() and not l.startswith("#")]
except OSError:
    ignore = None
    fail(".dockerignore is missing at the repository root (the build context would carry target/ and .quickstart/ secrets)")
if ignore is not None:
    for want in ("target", ".git", ".quickstart"):
        if not any(l.strip("/").lstrip("*/") == want for l in ignore):
            fail(f".dockerignore does not exclude {want}/")

for p in problems:
    print(f"FAIL: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"ok: {len(objects)} objects in {len(files)} files, {len(pods)} pod templates, compose, Dockerfile, .dockerignore")
PY

if [ "$status" -ne 0 ]; then
  echo "deploy/check.sh: FAILED (see the lines above)" >&2
  exit 1
fi
echo "deploy/check.sh: all checks passed"
