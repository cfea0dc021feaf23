r"""One command per role of a deployed DSSGD run (docs/deployment.md).

  python -m dssgd_jax.flower tls DIR --hosts=NAME      # server: CA + certificate
  python -m dssgd_jax.flower key DIR/p0                # participant: key pair
  python -m dssgd_jax.flower superlink --tls=DIR --state=DIR
  python -m dssgd_jax.flower register DIR/p0.pub --ca=DIR/ca.crt
  python -m dssgd_jax.flower participant --ca=ca.crt --key=DIR/p0 \
      --partition_id=0 --state_dir=DIR [--data_dir=DIR]
  python -m dssgd_jax.flower run --ca=ca.crt --flags="--flagfile=... --workdir=..."
  python -m dssgd_jax.flower status --ca=ca.crt        # runs and participants
  python -m dssgd_jax.flower stop --ca=ca.crt [RUN_ID]

Each command runs Flower's own programs (``flower-superlink``,
``flower-supernode``, ``flwr``) with the flags that make a run secure: TLS on
every connection (``--ca``; ``--insecure`` only for a trial on one machine),
SuperNode authentication (only registered participants' keys may join), no
packages installed at run time. ``participant`` keeps the participant in one
warm process (:mod:`.executor`): its data, model and compiled programs stay
in memory between visits. Every wait has a deadline and says what it waited
for; bad input ends in one sentence and exit status 2.
"""

import argparse
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
DEFAULT_ADDRESS = "127.0.0.1:9093"
CONNECTION = "dssgd"
# How long a participant retries a refused activation: the SuperLink marks
# a hard-killed SuperNode offline 60-70 s after its last heartbeat.
ACTIVATION_RETRY_S = 75.0
# How long `run` waits for the SuperLink to start the run's ServerApp.
START_TIMEOUT_S = 90.0


class UsageError(Exception):
  """One sentence for the user (exit status 2)."""


def _env() -> dict:
  return dict(os.environ, FLWR_TELEMETRY_ENABLED="0",
              FLWR_DISABLE_UPDATE_CHECK="1")


# ----------------------------------------------------------------------------
# Certificates and keys (the `cryptography` package, a Flower dependency).


LOCAL_HOSTS = ("127.0.0.1", "localhost")


def certificate_hosts(hosts: list[str]) -> list[str]:
  """``hosts`` and always 127.0.0.1 and localhost: the SuperLink's own
  processes dial it there (Flower turns 0.0.0.0 into 127.0.0.1).

  >>> certificate_hosts(["dssgd.example.org"])
  ['dssgd.example.org', '127.0.0.1', 'localhost']
  >>> certificate_hosts(["localhost", ""])
  ['localhost', '127.0.0.1']
  """
  out = []
  for h in list(hosts) + list(LOCAL_HOSTS):
    h = h.strip()
    if h and h not in out and h not in ("0.0.0.0", "::"):
      out.append(h)
  return out


def write_tls(out: str, hosts: list[str]) -> dict[str, str]:
  """A CA and a server certificate for ``hosts`` (IPs or DNS names; 127.0.0.1
  and localhost are always added, :func:`certificate_hosts`) in ``out``:
  ``ca.crt`` (give it to every participant), ``ca.key``, ``server.pem``,
  ``server.key`` (keep them on the server)."""
  hosts = certificate_hosts(hosts)
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import rsa  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(
      days=365)
  ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                          "dssgd_jax run CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), True)
        .sign(ca_key, hashes.SHA256()))
  names = []
  for h in hosts:
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(h)))
    except ValueError:
      names.append(x509.DNSName(h))
  key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                      hosts[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.SubjectAlternativeName(names), False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                         True)
          .add_extension(x509.ExtendedKeyUsage(
              [ExtendedKeyUsageOID.SERVER_AUTH]), False)
          .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  paths = {n: os.path.join(out, n) for n in ("ca.crt", "ca.key",
                                             "server.pem", "server.key")}

  def write(path, data, private):
    with open(path, "wb") as f:
      f.write(data)
    os.chmod(path, 0o600 if private else 0o644)

  write(paths["ca.crt"], ca.public_bytes(pem), False)
  write(paths["ca.key"], ca_key.private_bytes(
      pem, serialization.PrivateFormat.TraditionalOpenSSL,
      serialization.NoEncryption()), True)
  write(paths["server.pem"], cert.public_bytes(pem), False)
  write(paths["server.key"], key.private_bytes(
      pem, serialization.PrivateFormat.TraditionalOpenSSL,
      serialization.NoEncryption()), True)
  return paths


def write_key(path: str) -> tuple[str, str]:
  """A participant's SuperNode key pair (ECDSA P-384, OpenSSH format):
  ``path`` (private: never leaves the participant) and ``path.pub`` (send
  it to the server's operator to register)."""
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  k = ec.generate_private_key(ec.SECP384R1())
  with open(path, "wb") as f:
    f.write(k.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption()))
  os.chmod(path, 0o600)
  with open(path + ".pub", "wb") as f:
    f.write(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
            + f" {os.path.basename(path)}\n".encode())
  return path, path + ".pub"


# ----------------------------------------------------------------------------
# Checks before anything starts.


def _need_file(flag: str, path: str | None) -> str:
  if not path or not os.path.isfile(path):
    raise UsageError(f"{flag}={path} is not a file.")
  return os.path.abspath(path)


def _host_port(flag: str, address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UsageError(f"{flag}={address} is not host:port.")
  return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on now (the system picks it)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
  with socket.socket() as s:
    s.settimeout(1.0)
    return s.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1",
                         port)) == 0


def wait_for(address: str, deadline_s: float, what: str) -> None:
  """Waits until ``address`` accepts TCP connections.

  Raises:
    UsageError: not within ``deadline_s`` seconds (names ``what``).
  """
  host, port = _host_port("--superlink", address)
  end = time.time() + deadline_s
  while True:
    if _port_in_use(host, port):
      return
    if time.time() > end:
      raise UsageError(f"{what} at {address} did not answer within "
                       f"{deadline_s:.0f} s; start it (python -m "
                       "dssgd_jax.flower superlink ...) or pass its address "
                       "with --superlink.")
    time.sleep(0.25)


def _certificate_names(pem_path: str) -> list[str]:
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  with open(pem_path, "rb") as f:
    cert = x509.load_pem_x509_certificate(f.read())
  try:
    san = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
  except x509.ExtensionNotFound:
    return []
  return ([str(n) for n in san.get_values_for_type(x509.IPAddress)] +
          list(san.get_values_for_type(x509.DNSName)))


def check_tls(address: str, ca: str, timeout: float = 10.0) -> None:
  """Connects to ``address`` and verifies its certificate with ``ca`` for
  the host dialled, as Flower's clients do.

  Raises:
    UsageError: not reachable, or the certificate does not verify (one
      sentence with the fix).
  """
  host, port = _host_port("--superlink", address)
  ctx = ssl.create_default_context(cafile=ca)
  try:
    with socket.create_connection((host, port), timeout=timeout) as raw:
      with ctx.wrap_socket(raw, server_hostname=host):
        return
  except ssl.SSLCertVerificationError as e:
    raise UsageError(
        f"The SuperLink at {address} presents a certificate that does not "
        f"verify for '{host}' with {ca} ({e.verify_message}); make its "
        f"certificate with `python -m dssgd_jax.flower tls DIR "
        f"--hosts={host}` and restart the SuperLink with it, or dial a name "
        "the certificate covers.") from None
  except ssl.SSLError as e:
    raise UsageError(f"The SuperLink at {address} did not complete a TLS "
                     f"handshake ({e.reason or e}); is it started with "
                     "--tls (or is this a --insecure trial)?") from None
  except OSError as e:
    raise UsageError(f"The SuperLink at {address} is not reachable "
                     f"({e.strerror or e}); start it (python -m "
                     "dssgd_jax.flower superlink ...) or pass its address "
                     "with --superlink.") from None


# ----------------------------------------------------------------------------
# The SuperLink.


def superlink_command(args) -> tuple[list[str], dict]:
  host, port = _host_port("--address", args.address)
  if _port_in_use(host, port):
    raise UsageError(f"--address={args.address}: port {port} is in use "
                     "(another SuperLink?); stop it or pass another "
                     "--address.")
  cmd = ["flower-superlink", "--host", host, "--port", str(port),
         "--disable-runtime-dependency-installation"]
  if args.state:
    os.makedirs(args.state, exist_ok=True)
    cmd += ["--database", os.path.join(os.path.abspath(args.state),
                                       "superlink.db")]
  # The SuperLink's executor starts each run's ServerApp: ask every 0.1 s,
  # not Flower's default 1 s.
  env = dict(_env(), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
  if args.insecure:
    return cmd + ["--insecure"], env
  tls = args.tls
  pem = _need_file("--tls", os.path.join(tls or "", "server.pem"))
  names = _certificate_names(pem)
  if "127.0.0.1" not in names:
    raise UsageError(
        f"{pem} covers {', '.join(names) or 'no name'} but not 127.0.0.1, "
        "which the SuperLink's own processes dial; make the certificate "
        "again with `python -m dssgd_jax.flower tls` (it always adds "
        "127.0.0.1 and localhost).")
  cmd += ["--ssl-ca-certfile", _need_file("--tls", os.path.join(tls, "ca.crt")),
          "--ssl-certfile", pem,
          "--ssl-keyfile", _need_file("--tls", os.path.join(tls,
                                                            "server.key"))]
  return cmd + ["--enable-supernode-auth"], env


# ----------------------------------------------------------------------------
# Flower's CLI (register, run, status, stop).


class FlwrHome:
  """A FLWR_HOME whose config.toml names the SuperLink ``dssgd``: the one
  given, or a temporary one removed at exit."""

  def __init__(self, args):
    self.temporary = not args.flwr_home
    self.path = args.flwr_home or tempfile.mkdtemp(prefix="dssgd_flwr_")
    os.makedirs(self.path, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "",
             f"[superlink.{CONNECTION}]", f'address = "{args.superlink}"']
    if args.insecure:
      lines.append("insecure = true")
    else:
      lines.append(f'root-certificates = "{_need_file("--ca", args.ca)}"')
    with open(os.path.join(self.path, "config.toml"), "w") as f:
      f.write("\n".join(lines) + "\n")
    self.env = dict(_env(), FLWR_HOME=self.path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.temporary:
      shutil.rmtree(self.path, ignore_errors=True)

  def json(self, *cmd, timeout: float = 60.0) -> dict:
    """Runs ``flwr CMD --format json``; its JSON answer.

    Raises:
      UsageError: flwr failed (it prints ``success: false`` and exits 0).
    """
    try:
      out = subprocess.run(["flwr", *cmd, "--format", "json"], env=self.env,
                           capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
      raise UsageError(f"`flwr {' '.join(cmd)}` did not answer within "
                       f"{timeout:.0f} s.") from None
    text = out.stdout
    try:
      res = json.loads(text[text.index("{"):])
    except ValueError:
      raise UsageError(f"`flwr {' '.join(cmd)}` failed: "
                       f"{(out.stdout + out.stderr).strip()[-300:]}") from None
    if not res.get("success", False):
      raise UsageError(f"`flwr {' '.join(cmd)}` failed: "
                       f"{res.get('error-message', res)}")
    return res


def _check_superlink(args) -> None:
  """The SuperLink answers and (with TLS) its certificate verifies, for the
  address given and for 127.0.0.1 when it runs here."""
  wait_for(args.superlink, 10.0, "The SuperLink")
  if args.insecure:
    return
  ca = _need_file("--ca", args.ca)
  check_tls(args.superlink, ca)
  host, port = _host_port("--superlink", args.superlink)
  if host not in ("127.0.0.1", "localhost") and _port_in_use("127.0.0.1",
                                                             port):
    try:  # a SuperLink on this machine: its own processes dial 127.0.0.1
      check_tls(f"127.0.0.1:{port}", ca)
    except UsageError as e:
      if "does not verify" in str(e):
        raise UsageError(
            f"The SuperLink's certificate does not cover 127.0.0.1, which "
            "its own processes dial to start the run; make it again with "
            "`python -m dssgd_jax.flower tls` (it always adds 127.0.0.1 "
            "and localhost) and restart the SuperLink.") from None


def run_register(args) -> int:
  key = _need_file("public_key", args.public_key)
  _check_superlink(args)
  with FlwrHome(args) as home:
    res = home.json("supernode", "register", key, CONNECTION)
  print(f"Registered {key} (node {res.get('node-id')}); its participant can "
        "now start.")
  return 0


def canonical_flags(cfg) -> str:
  """The run's flags as one string, every non-default flag spelled out
  (flagfiles expanded) and every path made absolute where the command was
  typed: the server reads them as given here."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  out = []
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if v == getattr(config_lib.DEFAULTS, f.name) or v is None:
      continue
    if f.name in ("workdir", "data_dir"):
      v = os.path.abspath(v)
    if isinstance(v, bool):
      v = "true" if v else "false"
    out.append(shlex.quote(f"--{f.name}={v}"))
  return " ".join(out)


def _stop_run(home: FlwrHome, run_id: str) -> None:
  try:
    home.json("stop", run_id, CONNECTION, timeout=60)
  except UsageError:
    pass  # already finished


def run_run(args) -> int:
  """Checks everything, starts the run, streams its log, watches it start;
  exit status 0 when it completed. Ctrl-C stops the run."""
  from dssgd_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import server_app  # pylint: disable=g-import-not-at-top
  try:
    cfg = server_app.parse_flags(args.flags)  # fail here, not on the server
    from dssgd_jax.run import build, outputs  # pylint: disable=g-import-not-at-top
    cfg = cfg.replace(workdir=os.path.abspath(cfg.workdir))
    if os.path.isdir(cfg.workdir):  # the server's work directory, here
      outputs.check_resumable(cfg.workdir, build.plan(cfg))
  except UserError as e:
    raise UsageError(str(e)) from None
  if not args.reply_timeout > 0 or not args.connect_timeout > 0:
    raise UsageError("--reply_timeout and --connect_timeout must be "
                     "positive.")
  _check_superlink(args)
  run_config = " ".join([
      f"flags={json.dumps(canonical_flags(cfg))}",
      f"reply-timeout={float(args.reply_timeout)}",
      f"connect-timeout={float(args.connect_timeout)}",
      f"server-eval={'true' if args.server_eval else 'false'}"])
  def terminated(*_):
    raise KeyboardInterrupt  # SIGTERM stops the run as Ctrl-C does

  signal.signal(signal.SIGTERM, terminated)
  with FlwrHome(args) as home:
    proc = subprocess.Popen(["flwr", "run", APP_DIR, CONNECTION,
                             "--run-config", run_config, "--stream"],
                            env=home.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    state = {"run_id": None, "running": False}
    watchdog_error = []

    def watch():
      """Stops a run that does not start within START_TIMEOUT_S."""
      end = time.time() + args.start_timeout
      while proc.poll() is None:
        time.sleep(1.0)
        run_id = state["run_id"]
        if run_id is None or state["running"]:
          if run_id is None and time.time() > end:
            watchdog_error.append("flwr run did not start a run within "
                                  f"{args.start_timeout:.0f} s.")
            proc.terminate()
            return
          continue
        try:
          info = home.json("ls", CONNECTION, "--run-id", run_id)["runs"][0]
        except (UsageError, KeyError, IndexError):
          continue
        if info.get("status") not in ("pending", "starting"):
          state["running"] = True
        elif time.time() > end:
          watchdog_error.append(
              f"run {run_id} did not start within {args.start_timeout:.0f} "
              "s (still " + info.get("status") + "): the SuperLink's "
              "executor is not starting ServerApps; see the SuperLink's log "
              "(a certificate that does not cover 127.0.0.1?). The run was "
              "stopped.")
          _stop_run(home, run_id)
          proc.terminate()
          return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
      for line in proc.stdout:  # stream the server's log, note the run's id
        sys.stdout.write(line)
        sys.stdout.flush()
        m = re.search(r"Successfully started run (\d+)", line)
        if m:
          state["run_id"] = m.group(1)
      rc = proc.wait()
    except KeyboardInterrupt:
      if state["run_id"]:
        _stop_run(home, state["run_id"])
      os.killpg(proc.pid, signal.SIGTERM)
      proc.wait()
      print(f"error: Interrupted: run {state['run_id']} was stopped; run the "
            "same command to resume it from its last checkpoint.",
            file=sys.stderr)
      return 130
    if watchdog_error:
      print(f"error: {watchdog_error[0]}", file=sys.stderr)
      return 1
    run_id = state["run_id"]
    if rc != 0:
      return rc
    # `flwr run --stream` exits 0 even when the ServerApp failed: ask the
    # SuperLink how the run ended.
    if run_id is None:
      print("error: flwr run did not start a run.", file=sys.stderr)
      return 1
    info = home.json("ls", CONNECTION, "--run-id", run_id)["runs"][0]
  if info.get("status") != "finished:completed":
    print(f"error: run {run_id} ended {info.get('status')}: "
          f"{info.get('status-details')}", file=sys.stderr)
    return 1
  return 0


def run_status(args) -> int:
  """The SuperLink's runs and its participants' nodes."""
  _check_superlink(args)
  with FlwrHome(args) as home:
    runs = home.json("ls", CONNECTION)["runs"]
    nodes = home.json("supernode", "list", CONNECTION)["nodes"]
  print(f"runs ({len(runs)}):")
  for r in runs:
    print(f"  {r['run-id']}  {r['status']:<20} elapsed "
          f"{float(r.get('elapsed') or 0):.0f} s"
          + ("" if r.get("status-details") in (None, "N/A") else
             f"  ({r['status-details']})"))
  live = [n for n in nodes if n.get("status") == "online"]
  print(f"participants' nodes ({len(live)} online of {len(nodes)} "
        "registered):")
  for n in nodes:
    print(f"  {n['node-id']}  {n.get('status')}")
  return 0


def run_stop(args) -> int:
  """Stops one run, or every run that has not finished."""
  _check_superlink(args)
  with FlwrHome(args) as home:
    if args.run_id:
      ids = [args.run_id]
    else:
      ids = [r["run-id"] for r in home.json("ls", CONNECTION)["runs"]
             if not str(r.get("status", "")).startswith("finished")]
    for run_id in ids:
      home.json("stop", run_id, CONNECTION)
      print(f"Stopped run {run_id}.")
  if not ids:
    print("No run is going.")
  return 0


# ----------------------------------------------------------------------------
# A participant: its SuperNode and its warm app process.


def _policy_config(args) -> list[str]:
  if not args.epsilon_budget > 0 or not 0 < args.delta_budget < 1:
    raise UsageError(f"--epsilon_budget={args.epsilon_budget} must be "
                     f"positive and --delta_budget={args.delta_budget} in "
                     "(0, 1).")
  return [f"require-guarantee={'false' if args.allow_no_guarantee else 'true'}",
          f"epsilon-budget={float(args.epsilon_budget)!r}",
          f"delta-budget={float(args.delta_budget)!r}",
          f"report-metrics={'true' if args.report_metrics else 'false'}"]


def participant_command(args, port: int) -> list[str]:
  """The SuperNode of a participant (:mod:`.supernode`, process isolation:
  the app runs in the participant's own process)."""
  _host_port("--superlink", args.superlink)
  if args.partition_id < 0:
    raise UsageError(f"--partition_id={args.partition_id} must be 0 or more.")
  node = [f"partition-id={args.partition_id}",
          f"state-dir={json.dumps(os.path.abspath(args.state_dir))}"]
  if args.data_dir:
    path = os.path.join(args.data_dir, "data.npz")
    if not os.path.isfile(path):
      raise UsageError(f"--data_dir={args.data_dir} holds no data.npz.")
    from dssgd_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    from dssgd_jax.flower import node as node_lib  # pylint: disable=g-import-not-at-top
    try:
      node_lib.check_data_file(path)  # what can be checked before a run
    except UserError as e:
      raise UsageError(str(e)) from None
    node.append(f"data-dir={json.dumps(os.path.abspath(args.data_dir))}")
  if args.seed is not None:
    node.append(f"seed={int(args.seed)}")
  node += _policy_config(args)
  cmd = [sys.executable, "-m", "dssgd_jax.flower.supernode",
         "--superlink", args.superlink, "--node-config", " ".join(node),
         "--isolation", "process", "--host", "127.0.0.1",
         "--port", str(port)]
  if args.insecure:
    return cmd + ["--insecure"]
  return cmd + ["--root-certificates", _need_file("--ca", args.ca),
                "--auth-supernode-private-key", _need_file("--key", args.key)]


def _log(msg: str) -> None:
  print(f"[dssgd participant {time.strftime('%H:%M:%S')}] {msg}",
        file=sys.stderr, flush=True)


def run_participant(args) -> int:
  """Starts the participant's SuperNode and serves its messages in this
  process until stopped (Ctrl-C or SIGTERM)."""
  if args.port and _port_in_use("127.0.0.1", args.port):
    raise UsageError(f"--port={args.port} is in use on this machine "
                     "(another participant?); pass another --port, or none "
                     "to take a free one.")
  if not args.insecure:
    _need_file("--ca", args.ca)
    _need_file("--key", args.key)
  participant_command(args, args.port or 1)  # every check, before waiting
  os.makedirs(args.state_dir, exist_ok=True)
  home = args.flwr_home or os.path.join(os.path.abspath(args.state_dir),
                                        "flwr_home")
  os.makedirs(home, exist_ok=True)
  wait_for(args.superlink, args.connect_timeout, "The SuperLink")
  if not args.insecure:
    check_tls(args.superlink, args.ca)
  from dssgd_jax.flower import client_app  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import executor  # pylint: disable=g-import-not-at-top
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *a: stop.set())
  first_refusal = None
  port = args.port or free_port()
  try:
    while not stop.is_set():
      cmd = participant_command(args, port)
      child = subprocess.Popen(cmd, env=dict(_env(), FLWR_HOME=home),
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
      seen = {"refused": False, "port": False}

      def relay(child=child, seen=seen):
        for line in child.stdout:
          if "Failed to activate SuperNode" in line:
            seen["refused"] = True
          if "address already in use" in line or (
              "Runtime HTTP API failed to start" in line):
            seen["port"] = True
          if args.verbose or "ERROR" in line or "WARNING" in line or (
              "Failed to activate" in line):
            sys.stderr.write(line)
            sys.stderr.flush()

      reader = threading.Thread(target=relay, daemon=True)
      reader.start()
      serving = threading.Thread(
          target=executor.serve,
          args=(f"127.0.0.1:{port}", client_app.handle, stop),
          kwargs=dict(log=_log if args.verbose else None, child=child),
          daemon=True)
      serving.start()
      _log(f"participant {args.partition_id} connecting to "
           f"{args.superlink} (local app port {port}).")
      while child.poll() is None and not stop.is_set():
        time.sleep(0.2)
      if stop.is_set():
        break
      reader.join(timeout=2.0)
      if seen["port"] and not args.port:
        port = free_port()  # taken between the check and the start
        continue
      if seen["port"]:
        raise UsageError(f"--port={port} is in use on this machine; pass "
                         "another --port, or none to take a free one.")
      if seen["refused"]:
        now = time.time()
        first_refusal = first_refusal or now
        if now - first_refusal < args.activation_retry:
          _log("the SuperLink refused this key: it still marks its earlier "
               "session online (a participant stopped without signing off "
               "is marked offline 60-70 s after its last heartbeat); "
               f"retrying for up to {args.activation_retry:.0f} s.")
          stop.wait(10.0)
          continue
        raise UsageError(
            f"The SuperLink refused the key {args.key} for "
            f"{args.activation_retry:.0f} s: it is not registered (or was "
            "unregistered); send its .pub file to the operator to run "
            "`python -m dssgd_jax.flower register`.")
      raise UsageError(f"The participant's SuperNode ended (exit status "
                       f"{child.returncode}); see the lines above "
                       "(--verbose shows all of Flower's).")
  except KeyboardInterrupt:
    stop.set()
  finally:
    stop.set()
    if "child" in locals() and child.poll() is None:
      child.terminate()  # graceful: the SuperNode signs off at once
      try:
        child.wait(timeout=20)
      except subprocess.TimeoutExpired:
        child.kill()
  _log(f"participant {args.partition_id} stopped.")
  return 0


# ----------------------------------------------------------------------------
# The command line.


def _parser() -> argparse.ArgumentParser:
  fmt = argparse.ArgumentDefaultsHelpFormatter
  p = argparse.ArgumentParser(
      prog="python -m dssgd_jax.flower", formatter_class=fmt,
      description="DSSGD with each participant on its own machine, over "
      "Flower's deployment engine (docs/deployment.md).")
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("tls", help="server: a CA and a server certificate",
                     formatter_class=fmt)
  c.add_argument("dir", help="directory for ca.crt, ca.key, server.pem and "
                 "server.key")
  c.add_argument("--hosts", default="",
                 help="comma-separated names or IPs participants dial "
                 "(127.0.0.1 and localhost are always added)")

  c = sub.add_parser("key", help="participant: a SuperNode key pair",
                     formatter_class=fmt)
  c.add_argument("path", help="private key path (the public key: PATH.pub)")

  c = sub.add_parser("superlink", help="server: start the SuperLink",
                     formatter_class=fmt)
  c.add_argument("--address", default=DEFAULT_ADDRESS,
                 help="host:port it listens on (0.0.0.0:PORT: every "
                 "interface)")
  c.add_argument("--tls", help="directory written by `tls`")
  c.add_argument("--state", help="directory of the SuperLink's database "
                 "(registered participants and runs; survives a restart)")
  c.add_argument("--insecure", action="store_true",
                 help="no TLS and no authentication (a trial on one machine)")

  for name, text in (
      ("register", "server: let a participant's key join"),
      ("run", "server: start the run (the ServerApp) and stream its log"),
      ("status", "server: list the runs and the participants' nodes"),
      ("stop", "server: stop a run (or every run still going)"),
      ("participant", "participant: start its SuperNode and serve its "
       "messages")):
    c = sub.add_parser(name, help=text, formatter_class=fmt)
    c.add_argument("--superlink", default=DEFAULT_ADDRESS,
                   help="host:port of the SuperLink")
    c.add_argument("--ca", help="the run's ca.crt (not with --insecure)")
    c.add_argument("--insecure", action="store_true",
                   help="no TLS (a trial on one machine)")
    c.add_argument("--flwr_home", help="Flower's settings directory "
                   "(default: a temporary one, removed at exit; for a "
                   "participant: STATE_DIR/flwr_home)")
    if name == "register":
      c.add_argument("public_key", help="the participant's KEY.pub")
    elif name == "stop":
      c.add_argument("run_id", nargs="?",
                     help="the run to stop (default: every run still going)")
    elif name == "run":
      c.add_argument("--flags", required=True,
                     help="the run's flags, as for python -m dssgd_jax.main "
                     "(relative paths are taken from where this command "
                     "runs)")
      c.add_argument("--reply_timeout", type=float, default=600.0,
                     help="seconds the server waits for one upload before "
                     "it counts it as lost")
      c.add_argument("--connect_timeout", type=float, default=120.0,
                     help="seconds the server waits for all participants "
                     "before epoch 1")
      c.add_argument("--start_timeout", type=float, default=START_TIMEOUT_S,
                     help="seconds to wait for the SuperLink to start the "
                     "run before it is stopped")
      c.add_argument("--server_eval", action=argparse.BooleanOptionalAction,
                     default=True, help="evaluate the server's model on the "
                     "public test split")
    elif name == "participant":
      c.add_argument("--key", help="the participant's private key")
      c.add_argument("--partition_id", type=int, required=True,
                     help="its position 0..N-1 in the run (from the "
                     "operator)")
      c.add_argument("--state_dir", required=True,
                     help="where its models, seed and ledger are kept")
      c.add_argument("--data_dir", help="directory of its data.npz "
                     "(default: its part of the run's public dataset, for "
                     "trials)")
      c.add_argument("--seed", type=int,
                     help="its PRNG seed (tests only; default: a secret "
                     "random one)")
      c.add_argument("--port", type=int, default=0,
                     help="local port of its SuperNode's app API (0: a "
                     "free one)")
      c.add_argument("--connect_timeout", type=float, default=60.0,
                     help="seconds to wait for the SuperLink to answer")
      c.add_argument("--activation_retry", type=float,
                     default=ACTIVATION_RETRY_S,
                     help="seconds to retry a refused sign-in (a key whose "
                     "earlier session is still marked online)")
      c.add_argument("--allow_no_guarantee", action="store_true",
                     help="accept upload rules without a differential-"
                     "privacy guarantee (by default such epochs are "
                     "refused)")
      c.add_argument("--epsilon_budget", type=float, default=10.0,
                     help="refuse any epoch that would bring this machine's "
                     "total ε, over every run, above this")
      c.add_argument("--delta_budget", type=float, default=1e-5,
                     help="the same for the total δ")
      c.add_argument("--report_metrics", action="store_true",
                     help="send the training loss and the own model's test "
                     "accuracy to the server (no ε covers them; by default "
                     "they stay here)")
      c.add_argument("--verbose", action="store_true",
                     help="show Flower's log lines and one line per message")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "tls":
      paths = write_tls(args.dir, args.hosts.split(","))
      print(f"Wrote {paths['ca.crt']} (give it to every participant) and "
            f"{paths['server.pem']}, {paths['server.key']}, {paths['ca.key']}"
            " (keep them on the server); the certificate covers "
            f"{', '.join(_certificate_names(paths['server.pem']))}.")
      return 0
    if args.command == "key":
      priv, pub = write_key(args.path)
      print(f"Wrote {priv} (keep it) and {pub} (send it to the server's "
            "operator).")
      return 0
    if shutil.which("flower-superlink") is None:
      raise UsageError("Flower is not installed: pip install -e "
                       "\".[flower]\".")
    if args.command == "superlink":
      cmd, env = superlink_command(args)
      print("+ " + " ".join(shlex.quote(x) for x in cmd), file=sys.stderr,
            flush=True)
      os.execvpe(cmd[0], cmd, env)
    if args.command != "participant" and not args.insecure:
      _need_file("--ca", args.ca)
    return {"register": run_register, "run": run_run, "status": run_status,
            "stop": run_stop, "participant": run_participant}[
                args.command](args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: Interrupted.", file=sys.stderr)
    return 130


if __name__ == "__main__":
  code = main()
  if sys.argv[1:2] == ["participant"]:
    # A participant stopped in the middle of a transfer leaves Flower's
    # object-transfer thread pools retrying the SuperNode it has just
    # stopped; the interpreter's exit would join them for ever. Everything
    # is written and the SuperNode is stopped: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)
