"""AWS credentials as a Bedrock provider's `auth` source holds them: an AWS shared credentials
file (INI), the format every AWS SDK and the AWS CLI read, so a Secret made from `~/.aws/credentials`
works as it is. Envoy reads the same file to sign (SigV4); Python only checks that it is usable
and signs the operator's probes with it.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass

from .secrets import SecretValue

# The profile Envoy's signer is told to read (envoygen.clusters._signers).
PROFILE = "default"


@dataclass(frozen=True, slots=True)
class AwsKeys:
    access_key: str
    secret_key: SecretValue
    session_token: SecretValue | None

    def __repr__(self) -> str:  # never the secret parts
        return f"AwsKeys(access_key={self.access_key!r})"


def parse(text: str) -> AwsKeys | None:
    """The `[default]` profile's keys, or None when the text holds no usable ones."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    if not parser.has_section(PROFILE):
        return None
    section = parser[PROFILE]
    access, secret = section.get("aws_access_key_id", "").strip(), section.get("aws_secret_access_key", "").strip()
    if not access or not secret:
        return None
    token = section.get("aws_session_token", "").strip()
    return AwsKeys(access, SecretValue(secret), SecretValue(token) if token else None)
