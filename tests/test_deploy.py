"""examples/deploy/: the systemd unit, the Dockerfile, the Prometheus config
and rules, the Ansible playbook.

Each file is checked by the tool made for it when the machine has it
(``systemd-analyze verify``, ``promtool check rules / test rules / check
config``, ``ansible-playbook --syntax-check``), and always by what needs
no tool: the unit's keys are parsed, the metrics the alert rules name are
compared with what a live gafferd exports, the Dockerfile's HEALTHCHECK
command is run against a live gafferd, the config is loaded by gafferd.
"""
import configparser
import json
import os
import re
import shlex
import shutil
import socket
import subprocess

import pytest

from conftest import PY, ROOT, run_gafferd, wait_for

DEPLOY = os.path.join(ROOT, "examples", "deploy")


def read(*parts):
    with open(os.path.join(DEPLOY, *parts), encoding="utf-8") as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_config(tmp_path, bind="127.0.0.1:0"):
    """examples/deploy/gaffer.ini made to run here: a token file in
    tmp_path, the API on ``bind``, the web server on a free port, syslog
    to a path nobody listens on."""
    token = tmp_path / "token"
    token.write_text("deploy-test-token\n")
    token.chmod(0o600)
    web = free_port()
    text = read("gaffer.ini")
    text = text.replace("/etc/gafferd/token", str(token))
    text = text.replace("bind = 0.0.0.0:5000", "bind = " + bind)
    text = text.replace("8080", str(web))
    text = text.replace("syslog_facility = daemon", "syslog_facility = daemon\n"
                        "syslog_address = %s" % (tmp_path / "no-syslog.sock"))
    text = text.replace("syslog_facility = local0", "syslog_facility = local0\n"
                        "syslog_address = %s" % (tmp_path / "no-syslog.sock"))
    settings = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert not [l for l in settings if "/etc/" in l or "8080" in l], settings
    return text, "deploy-test-token"


def tool(name):
    return shutil.which(name)


def run(argv, cwd=None, timeout=120):
    return subprocess.run(argv, cwd=cwd, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          stdin=subprocess.DEVNULL)


# -- the config ---------------------------------------------------------------------------------

def test_the_deploy_config_passes_check(tmp_path):
    text, _ = deploy_config(tmp_path, bind="0.0.0.0:5000")
    (tmp_path / "gaffer.ini").write_text(text)
    result = run_gafferd(["--check", str(tmp_path / "gaffer.ini")])
    assert result.returncode == 0, result.stderr
    assert "2 template(s), 1 endpoint(s): config OK" in result.stdout


# -- systemd --------------------------------------------------------------------------------

def unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read_string(read("gafferd.service"))
    return parser


def test_unit_is_type_notify_and_hardened():
    u = unit()
    service = u["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"].split() == ["/var/log/gafferd", "/var/lib/gafferd",
                                                 "/run/gafferd"]
    assert int(service["WatchdogSec"]) > 0
    assert service["KillMode"] == "mixed"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    caps = service["CapabilityBoundingSet"].split()
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= set(caps)   # uid switching works
    start = shlex.split(service["ExecStart"])
    assert start[1] == "/opt/gafferd/gafferd.py" and "--daemon" not in start
    check = shlex.split(service["ExecStartPre"])
    assert "--check" in check
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_unit_keys_gafferd_relies_on_match_its_behaviour(gafferd, tmp_path):
    """What the unit promises: started with NOTIFY_SOCKET and WATCHDOG_USEC
    as systemd sets them (WatchdogSec scaled down), gafferd says READY=1
    and pings the watchdog."""
    watchdog = int(unit()["Service"]["WatchdogSec"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    try:
        text, _ = deploy_config(tmp_path)
        gafferd(text, env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                           "WATCHDOG_USEC": str(watchdog * 1000000 // 100)})
        got = []
        while not any(m == "WATCHDOG=1" for m in got):
            got.append(sock.recv(4096).decode())
        assert got[0].startswith("READY=1\n"), got
    finally:
        sock.close()


def test_systemd_analyze_verify(tmp_path):
    """Runs where systemd-analyze is installed; the keys are parsed above either way."""
    analyze = tool("systemd-analyze")
    unit_path = tmp_path / "gafferd.service"
    unit_path.write_text(read("gafferd.service"))
    if analyze is None:
        assert unit()["Service"]["Type"] == "notify"
        return
    result = run([analyze, "verify", str(unit_path)])
    assert result.returncode == 0, result.stdout
    assert "gafferd.service" not in result.stdout, result.stdout   # no complaint about it


# -- Docker ---------------------------------------------------------------------------------

def dockerfile():
    """Instructions of the Dockerfile: [(KEYWORD, rest)], continuations joined."""
    out, current = [], ""
    for line in read("Dockerfile").splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if line.endswith("\\"):
            continue
        if current:
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def test_dockerfile_runs_gafferd_as_pid_1_with_a_python_healthcheck():
    steps = dict(dockerfile())
    entry = json.loads(steps["ENTRYPOINT"])          # exec form: no shell as PID 1
    assert entry[:2] == ["python3", "/opt/gafferd/gafferd.py"]
    assert "--daemon" not in entry + json.loads(steps["CMD"])
    assert steps["STOPSIGNAL"] == "SIGTERM"
    health = steps["HEALTHCHECK"]
    assert "curl" not in health and "wget" not in health
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:2] == ["python3", "-c"] and "/ready" in command[2]
    assert "urllib" in command[2]
    copies = [rest.split() for keyword, rest in dockerfile() if keyword == "COPY"]
    for src, _ in copies:
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_dockerfile_healthcheck_against_a_live_gafferd(gafferd, tmp_path):
    """The HEALTHCHECK command itself, pointed at a live gafferd: 0 when
    every template is ready, 1 when one is not; no token needed."""
    command = json.loads(dict(dockerfile())["HEALTHCHECK"].split("CMD", 1)[1])
    text, token = deploy_config(tmp_path)
    d = gafferd(text)
    code = command[2].replace("127.0.0.1:5000", "127.0.0.1:%d" % d.port)
    assert code != command[2]
    assert d.get("/status").status == 401                 # the API wants the token...
    wait_for(lambda: d.get("/ready").status == 200, timeout=20,
             message="every template ready")             # ...but /ready does not
    assert subprocess.run([PY, "-c", code], timeout=30).returncode == 0
    auth = {"Authorization": "Bearer " + token}
    assert d.post("/processes/web/_stop", headers=auth).status == 200
    stopped_is_fine = subprocess.run([PY, "-c", code], timeout=30).returncode
    assert stopped_is_fine == 0                           # stopped on purpose: still healthy
    body = {"name": "broken", "cmd": PY, "args": "-c 'import sys; sys.exit(1)'",
            "start_retries": 0}
    assert d.post("/processes", body=body, headers=auth).status == 200
    wait_for(lambda: d.get("/ready").status == 503, message="/ready to say 503")
    assert subprocess.run([PY, "-c", code], timeout=30, stderr=subprocess.DEVNULL
                          ).returncode == 1


# -- Prometheus -----------------------------------------------------------------------------

def rule_expressions():
    """Each alert's expression, read from the YAML by hand (no YAML library
    in the standard library): ``expr:`` on one line or a folded ``>`` block."""
    lines = read("prometheus", "gafferd-rules.yml").splitlines()
    out = {}
    alert = None
    for i, line in enumerate(lines):
        m = re.match(r"^\s*- alert: (\S+)$", line)
        if m:
            alert = m.group(1)
            continue
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in (">", "|", ">-", "|-"):
                block = []
                for more in lines[i + 1:]:
                    if more.strip() and len(more) - len(more.lstrip()) <= indent:
                        break
                    block.append(more.strip())
                value = " ".join(b for b in block if b)
            out[alert] = value
    return out


def live_metric_names(d):
    text = d.get("/metrics", headers={"Authorization": "Bearer deploy-test-token"}).body
    return set(re.findall(r"^# TYPE (\S+) ", text.decode(), re.M))


def test_alert_rules_name_only_metrics_gafferd_exports(gafferd, tmp_path):
    exprs = rule_expressions()
    assert {"GafferdTemplateNotReady", "GafferdRestartStorm", "GafferdOrphan"} <= set(exprs)
    text, _ = deploy_config(tmp_path)
    d = gafferd(text)
    exported = live_metric_names(d)
    functions = {"increase", "rate", "sum", "by", "on", "unless", "and", "or", "without",
                 "ignoring", "max", "min", "count"}
    for alert, expr in exprs.items():
        without_strings = re.sub(r'"[^"]*"', "", expr)
        without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
        without_groupings = re.sub(r"\b(on|by|without|ignoring)\s*\([^)]*\)", "",
                                   without_labels)
        names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", without_groupings))
        names -= functions
        names = {n for n in names if not re.fullmatch(r"\d+[smhd]?|[smhd]", n)}
        assert names, alert
        unknown = {n for n in names if n != "up" and n not in exported}
        assert not unknown, "%s names %s, which /metrics does not export (it has %s)" % (
            alert, unknown, sorted(exported))
    # The label the rules match on (name) is one gafferd puts on those metrics.
    body = d.get("/metrics", headers={"Authorization": "Bearer deploy-test-token"}).body
    for metric in ("gafferd_template_ready", "gafferd_template_target",
                   "gafferd_template_restarts_total"):
        assert re.search(r'^%s\{name="web"\} ' % metric, body.decode(), re.M), metric
    assert re.search(r'^gafferd_template_state\{name="web",state="stopped"\} 0$',
                     body.decode(), re.M)


def test_promtool_checks_and_tests_the_rules(tmp_path):
    promtool = tool("promtool")
    rules = os.path.join(DEPLOY, "prometheus", "gafferd-rules.yml")
    if promtool is None:
        # No promtool here: the rules file is at least well-formed as far as
        # a reader by hand can tell (every alert has an expression).
        exprs = rule_expressions()
        assert len(exprs) == read("prometheus", "gafferd-rules.yml").count("- alert:")
        return
    result = run([promtool, "check", "rules", rules])
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, result.stdout
    result = run([promtool, "test", "rules", "gafferd-rules.test.yml"],
                 cwd=os.path.join(DEPLOY, "prometheus"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout
    # The scrape config, with its credentials file made to exist here.
    shutil.copy(rules, str(tmp_path / "gafferd-rules.yml"))
    (tmp_path / "token").write_text("t\n")
    config = read("prometheus", "prometheus.yml").replace(
        "/etc/prometheus/gafferd.token", str(tmp_path / "token"))
    (tmp_path / "prometheus.yml").write_text(config)
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout


def test_scrape_config_sends_the_token_to_metrics():
    text = read("prometheus", "prometheus.yml")
    assert re.search(r"^\s+metrics_path: /metrics$", text, re.M)
    assert re.search(r"^\s+type: Bearer$", text, re.M)
    assert re.search(r"^\s+credentials_file: \S+$", text, re.M)
    assert re.search(r"^\s+- gafferd-rules.yml$", text, re.M)


# -- Ansible ----------------------------------------------------------------------------------

def test_playbook_installs_the_files_that_exist():
    text = read("ansible", "gafferd.yml")
    assert re.search(r"^  hosts: gafferd$", text, re.M)
    assert "[gafferd]" in read("ansible", "inventory.ini")
    base = os.path.join(DEPLOY, "ansible")
    variables = {
        "gafferd_repo": os.path.join(base, "..", "..", ".."),
        "gafferd_config": os.path.join(base, "..", "gaffer.ini"),
        "gafferd_unit": os.path.join(base, "..", "gafferd.service"),
    }
    for name, path in variables.items():
        assert re.search(r'%s: "\{\{ playbook_dir \}\}' % name, text), name
    sources = re.findall(r'src: "\{\{ (\w+) \}\}(/[^"]*)?"', text)
    assert {s for s, _ in sources} == set(variables)
    for var, rest in sources:
        assert os.path.exists(variables[var] + rest), (var, rest)
    dests = set(re.findall(r"dest: (\S+)", text))
    assert {"/opt/gafferd/gafferd.py", "/etc/gafferd/gaffer.ini",
            "/etc/systemd/system/gafferd.service", "/etc/gafferd/token"} <= dests
    # The paths the unit uses are the ones the playbook installs.
    service = unit()["Service"]
    assert "/opt/gafferd/gafferd.py" in service["ExecStart"]
    assert "/etc/gafferd/gaffer.ini" in service["ExecStart"]
    # The config is installed only when gafferd accepts it.
    assert "validate: /usr/bin/python3 /opt/gafferd/gafferd.py --check %s" in text


def test_ansible_playbook_syntax_check():
    playbook = tool("ansible-playbook")
    base = os.path.join(DEPLOY, "ansible")
    if playbook is None:
        # Not installed here: at least every task names a fully qualified module.
        modules = re.findall(r"^      (ansible\.builtin\.\w+):$", read("ansible", "gafferd.yml"),
                             re.M)
        assert set(modules) >= {"ansible.builtin.copy", "ansible.builtin.systemd"}
        return
    env = dict(os.environ, ANSIBLE_NOCOLOR="1")
    result = subprocess.run([playbook, "--syntax-check", "-i", "inventory.ini", "gafferd.yml"],
                            cwd=base, timeout=120, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout
    result = subprocess.run([playbook, "--list-tasks", "-i", "inventory.ini", "gafferd.yml"],
                            cwd=base, timeout=120, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout
    assert "The config is installed once gafferd accepts it" in result.stdout
