"""A private certificate authority and a server certificate for 127.0.0.1, as files,
and the arguments that make a ``redis-server`` listen with them (``--tls-port``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    """The CA a client trusts (``ca``), and the server's certificate and key it signed."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        authority = trustme.CA()
        certificate = authority.issue_cert("127.0.0.1")
        files = cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        authority.cert_pem.write_to_path(files.ca)
        certificate.cert_chain_pems[0].write_to_path(files.cert)
        certificate.private_key_pem.write_to_path(files.key)
        return files

    def server_args(self, tls_port: int) -> list[str]:
        """A TLS port besides the plain one (which the suite's helpers probe); clients
        show no certificate."""
        return [
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
