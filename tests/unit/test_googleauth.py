"""Google credentials (`auth.format: google-credentials`): what is accepted, how a failure to
mint looks, and that neither the key nor its failures leak (issue 14, Vertex AI).

The end-to-end path (minting against a token endpoint, renewal, Envoy sending the token) is in
tests/dataplane/test_vertex.py."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signalbox import gatewayfiles
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.errors import CredentialUnavailable
from signalbox.core.googleauth import GoogleToken, google_token
from signalbox.core.secrets import SecretValue
from signalbox.extproc.runtime import RuntimeTable, default_key_resolver
from tests.factories import backend, model, policy, provider


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_account(token_uri: str) -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "sa@p.iam.gserviceaccount.com",
        "token_uri": token_uri,
    }
    return json.dumps(info), pem


def vertex_config(path: str) -> pb.RoutingConfig:
    result = compile_config(
        [
            provider(
                "vertex",
                "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/publishers/google",
                [model("flash")],
                type="gemini",
                auth={"file": path, "format": "google-credentials"},
            )
        ],
        [policy("v", ["v"], [backend("vertex", "flash")])],
    )
    assert result.ok, result.problems
    return result.config


def test_google_credentials_send_a_bearer_token_whatever_the_providers_api():
    cfg = vertex_config("/nonexistent.json")
    auth = cfg.providers[0].auth
    assert (auth.header, auth.prefix, auth.format) == ("authorization", "Bearer ", pb.GOOGLE_CREDENTIALS)


def test_a_token_endpoint_that_cannot_be_reached_is_a_clear_error_without_the_key():
    raw, pem = service_account(f"http://127.0.0.1:{closed_port()}/token")
    token = google_token(SecretValue(raw))
    assert isinstance(token, GoogleToken) and token.minted
    assert google_token(SecretValue(raw)) is token  # one credentials object per JSON: one token
    with pytest.raises(CredentialUnavailable) as caught:
        token.reveal()
    text = str(caught.value)
    assert "cannot mint a Google access token" in text
    assert all(line not in text for line in pem.splitlines()[1:-1])
    assert "redacted" in repr(token)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"type": "authorized_user", "refresh_token": "r"}),
        json.dumps({"type": "service_account"}),
    ],
)
def test_content_that_is_not_usable_credentials_marks_the_provider_keyless(tmp_path, content, caplog):
    path = tmp_path / "sa.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        table = RuntimeTable.from_config(vertex_config(str(path)))
    assert table.backends["default/vertex/flash"].provider.key_missing
    assert "Google credentials" in caplog.text and "refresh_token" not in caplog.text


def test_usable_credentials_are_routed_to_without_minting_at_load(tmp_path):
    """The ext_proc loads a table without waiting on Google: the token is minted when used."""
    raw, _ = service_account(f"http://127.0.0.1:{closed_port()}/token")
    path = tmp_path / "sa.json"
    path.write_text(raw)
    table = RuntimeTable.from_config(vertex_config(str(path)))
    vertex = table.backends["default/vertex/flash"].provider
    assert not vertex.key_missing and vertex.auth_value is not None and vertex.auth_value.minted


def test_a_failed_mint_keeps_the_credential_file_in_force(tmp_path, caplog):
    raw, pem = service_account(f"http://127.0.0.1:{closed_port()}/token")
    path = tmp_path / "sa.json"
    path.write_text(raw)
    cfg = vertex_config(str(path))
    options = envoygen.GatewayOptions(credentials_dir=str(tmp_path / "credentials"))
    file = Path(envoygen.credential_file(str(tmp_path / "credentials"), cfg.providers[0].id))
    file.parent.mkdir()
    file.write_text("previous token")
    with caplog.at_level(logging.WARNING):
        gatewayfiles.refresh_tokens(cfg, tmp_path, options, default_key_resolver())
    assert file.read_text() == "previous token"
    assert "cannot mint" in caplog.text and pem.splitlines()[1] not in caplog.text
