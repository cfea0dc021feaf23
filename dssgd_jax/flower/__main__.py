"""One command per role of a deployed DSSGD run (docs/deployment.md).

  python -m dssgd_jax.flower tls DIR                  # server: CA + certificate
  python -m dssgd_jax.flower key DIR/p0               # participant: key pair
  python -m dssgd_jax.flower superlink --tls=DIR --state=DIR
  python -m dssgd_jax.flower register DIR/p0.pub --ca=DIR/ca.crt
  python -m dssgd_jax.flower participant --ca=ca.crt --key=DIR/p0 \\
      --partition_id=0 --state_dir=DIR [--data_dir=DIR]
  python -m dssgd_jax.flower run --ca=ca.crt --flags="--flagfile=... --workdir=..."

Each command runs Flower's own tool (``flower-superlink``,
``flower-supernode``, ``flwr``) with the flags that make a run secure: TLS on
every connection (``--ca``; ``--insecure`` only for a trial on one machine),
SuperNode authentication (only registered participants' keys may join), no
packages installed at run time. Bad input ends in one sentence and exit
status 2.
"""

import argparse
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app")
DEFAULT_ADDRESS = "127.0.0.1:9093"
CONNECTION = "dssgd"


class UsageError(Exception):
  """One sentence for the user (exit status 2)."""


# ----------------------------------------------------------------------------
# Certificates and keys (the `cryptography` package, a Flower dependency).


def write_tls(out: str, hosts: list[str]) -> dict[str, str]:
  """A CA and a server certificate for ``hosts`` (IPs or DNS names) in
  ``out``: ``ca.crt`` (give it to every participant), ``ca.key``,
  ``server.pem``, ``server.key`` (keep them on the server)."""
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
# Commands.


def _need_file(flag: str, path: str | None) -> str:
  if not path or not os.path.isfile(path):
    raise UsageError(f"{flag}={path} is not a file.")
  return os.path.abspath(path)


def _host_port(flag: str, address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UsageError(f"{flag}={address} is not host:port.")
  return host, int(port)


def superlink_command(args) -> list[str]:
  host, port = _host_port("--address", args.address)
  cmd = ["flower-superlink", "--host", host, "--port", str(port),
         "--disable-runtime-dependency-installation"]
  if args.state:
    os.makedirs(args.state, exist_ok=True)
    cmd += ["--database", os.path.join(os.path.abspath(args.state),
                                       "superlink.db")]
  if args.insecure:
    return cmd + ["--insecure"]
  tls = args.tls
  cmd += ["--ssl-ca-certfile", _need_file("--tls", os.path.join(tls or "",
                                                                "ca.crt")),
          "--ssl-certfile", _need_file("--tls", os.path.join(tls or "",
                                                             "server.pem")),
          "--ssl-keyfile", _need_file("--tls", os.path.join(tls or "",
                                                            "server.key"))]
  return cmd + ["--enable-supernode-auth"]


def participant_command(args) -> list[str]:
  _host_port("--superlink", args.superlink)
  if args.partition_id < 0:
    raise UsageError(f"--partition_id={args.partition_id} must be 0 or more.")
  node = [f"partition-id={args.partition_id}",
          f"state-dir={json.dumps(os.path.abspath(args.state_dir))}"]
  if args.data_dir:
    if not os.path.isfile(os.path.join(args.data_dir, "data.npz")):
      raise UsageError(f"--data_dir={args.data_dir} holds no data.npz.")
    node.append(f"data-dir={json.dumps(os.path.abspath(args.data_dir))}")
  if args.seed is not None:
    node.append(f"seed={int(args.seed)}")
  if not args.epsilon_budget > 0 or not 0 < args.delta_budget < 1:
    raise UsageError(f"--epsilon_budget={args.epsilon_budget} must be "
                     f"positive and --delta_budget={args.delta_budget} in "
                     "(0, 1).")
  node += [f"require-guarantee={'false' if args.allow_no_guarantee else 'true'}",
           f"epsilon-budget={float(args.epsilon_budget)!r}",
           f"delta-budget={float(args.delta_budget)!r}",
           f"report-metrics={'true' if args.report_metrics else 'false'}"]
  cmd = ["flower-supernode", "--superlink", args.superlink,
         "--node-config", " ".join(node), "--port", str(args.port)]
  if args.insecure:
    return cmd + ["--insecure"]
  return cmd + ["--root-certificates", _need_file("--ca", args.ca),
                "--auth-supernode-private-key", _need_file("--key", args.key)]


def _flwr_home(args) -> str:
  """A FLWR_HOME whose config.toml names the SuperLink ``dssgd``."""
  home = args.flwr_home or tempfile.mkdtemp(prefix="dssgd_flwr_")
  os.makedirs(home, exist_ok=True)
  lines = ["[superlink]", f'default = "{CONNECTION}"', "",
           f"[superlink.{CONNECTION}]", f'address = "{args.superlink}"']
  if args.insecure:
    lines.append("insecure = true")
  else:
    lines.append(f'root-certificates = "{_need_file("--ca", args.ca)}"')
  with open(os.path.join(home, "config.toml"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return home


def _flwr_env(args) -> dict:
  return dict(os.environ, FLWR_HOME=_flwr_home(args),
              FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")


def run_run(args) -> int:
  """Starts the run and streams its log; exit status 0 when it completed."""
  from dssgd_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from dssgd_jax.flower import server_app  # pylint: disable=g-import-not-at-top
  try:
    cfg = server_app.parse_flags(args.flags)  # fail here, not on the server
  except UserError as e:
    raise UsageError(str(e)) from None
  del cfg
  run_config = " ".join([
      f"flags={json.dumps(args.flags)}",
      f"reply-timeout={float(args.reply_timeout)}",
      f"connect-timeout={float(args.connect_timeout)}",
      f"server-eval={'true' if args.server_eval else 'false'}"])
  env = _flwr_env(args)
  proc = subprocess.Popen(["flwr", "run", APP_DIR, CONNECTION,
                           "--run-config", run_config, "--stream"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  run_id = None
  for line in proc.stdout:  # stream the server's log, note the run's id
    sys.stdout.write(line)
    sys.stdout.flush()
    m = re.search(r"Successfully started run (\d+)", line)
    if m:
      run_id = m.group(1)
  rc = proc.wait()
  if rc != 0:
    return rc
  # `flwr run --stream` exits 0 even when the ServerApp failed: ask the
  # SuperLink how the run ended.
  if run_id is None:
    print("error: flwr run did not start a run.", file=sys.stderr)
    return 1
  out = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", run_id,
                        "--format", "json"], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  try:
    info = json.loads(out.stdout[out.stdout.index("{"):])["runs"][0]
  except (ValueError, KeyError, IndexError):
    print(f"error: cannot read the status of run {run_id}: "
          f"{(out.stdout + out.stderr).strip()[-300:]}", file=sys.stderr)
    return 1
  if info.get("status") != "finished:completed":
    print(f"error: run {run_id} ended {info.get('status')}: "
          f"{info.get('status-details')}", file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m dssgd_jax.flower",
      description="DSSGD with each participant on its own machine, over "
      "Flower's deployment engine (docs/deployment.md).")
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("tls", help="server: a CA and a server certificate")
  c.add_argument("dir")
  c.add_argument("--hosts", default="127.0.0.1,localhost",
                 help="comma-separated IPs/names participants dial")

  c = sub.add_parser("key", help="participant: a SuperNode key pair")
  c.add_argument("path", help="private key path (the public key: PATH.pub)")

  c = sub.add_parser("superlink", help="server: start the SuperLink")
  c.add_argument("--address", default=DEFAULT_ADDRESS)
  c.add_argument("--tls", help="directory written by `tls`")
  c.add_argument("--state", help="directory of the SuperLink's database "
                 "(registered participants; survives a restart)")
  c.add_argument("--insecure", action="store_true",
                 help="no TLS and no authentication (a trial on one machine)")

  for name, text in (("register", "server: let a participant's key join"),
                     ("run", "server: start the run (the ServerApp)"),
                     ("participant", "participant: start its SuperNode")):
    c = sub.add_parser(name, help=text)
    c.add_argument("--superlink", default=DEFAULT_ADDRESS)
    c.add_argument("--ca", help="the run's ca.crt")
    c.add_argument("--insecure", action="store_true")
    c.add_argument("--flwr_home", help="Flower CLI home (default: a "
                   "temporary directory)")
    if name == "register":
      c.add_argument("public_key")
    elif name == "run":
      c.add_argument("--flags", required=True,
                     help="the run's flags, as for python -m dssgd_jax.main")
      c.add_argument("--reply_timeout", type=float, default=600.0)
      c.add_argument("--connect_timeout", type=float, default=120.0)
      c.add_argument("--server_eval", action=argparse.BooleanOptionalAction,
                     default=True)
    else:
      c.add_argument("--key", help="the participant's private key")
      c.add_argument("--partition_id", type=int, required=True)
      c.add_argument("--state_dir", required=True)
      c.add_argument("--data_dir")
      c.add_argument("--seed", type=int)
      c.add_argument("--port", type=int, default=9094,
                     help="local port of this SuperNode's app API")
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

  args = p.parse_args(argv)
  try:
    if args.command == "tls":
      paths = write_tls(args.dir, args.hosts.split(","))
      print(f"Wrote {paths['ca.crt']} (give it to every participant) and "
            f"{paths['server.pem']}, {paths['server.key']}, {paths['ca.key']}"
            " (keep them on the server).")
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
      cmd = superlink_command(args)
    elif args.command == "participant":
      cmd = participant_command(args)
    elif args.command == "register":
      key = _need_file("public_key", args.public_key)
      return subprocess.run(["flwr", "supernode", "register", key,
                             CONNECTION], env=_flwr_env(args),
                            check=False).returncode
    else:
      return run_run(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("+ " + " ".join(shlex.quote(x) for x in cmd), file=sys.stderr,
        flush=True)
  os.execvp(cmd[0], cmd)
  return 0  # not reached


if __name__ == "__main__":
  sys.exit(main())
