"""A local Azure Blob Storage server for tests: Azurite in a child process.

Azurite is Microsoft's emulator (npm package ``azurite``; needs Node.js). Install it with
``npm install -g azurite``, or into a virtualenv's bin folder (``scripts/setup.sh`` does that),
or point ``AZURITE_BLOB`` at its ``azurite-blob`` executable. It checks Shared Key signatures,
so wrong credentials are refused as Azure refuses them.
"""

from __future__ import annotations

from typing import Any

from .process import ChildServer, find_executable

# Azurite's well-known development account, published in its documentation.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str:
    """The azurite-blob executable: ``$AZURITE_BLOB``, on PATH, or beside this Python."""
    found = find_executable("azurite-blob", "AZURITE_BLOB")
    if found:
        return found
    raise RuntimeError(
        "Azurite is not installed: `npm install -g azurite` (Node.js 18+), or set AZURITE_BLOB "
        "to its azurite-blob executable"
    )


class AzuriteServer(ChildServer):
    """Azurite's blob service on 127.0.0.1, data in memory."""

    name = "azurite"

    def command(self) -> list[str]:
        return [
            azurite_binary(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> AzuriteServer:
        return super().start(timeout)  # type: ignore[no-any-return]

    def __enter__(self) -> AzuriteServer:
        return self.start()

    @property
    def connection_string(self) -> str:
        return self.connection_string_with_key(ACCOUNT_KEY)

    def connection_string_with_key(self, key: str) -> str:
        """A connection string for this server with another account key (to test refusals)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={key};"
            f"BlobEndpoint={self.endpoint_url}/{ACCOUNT_NAME};"
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        """adlfs options that reach this server."""
        return {"connection_string": self.connection_string}

    def sas_token(self, container: str | None = None, hours: float = 24.0) -> str:
        """A SAS token signed with the development account's key that grants read, write,
        delete and list: on ``container`` only, or (``None``) on every container of the
        account, as a container or account owner would hand one out."""
        import datetime

        from azure.storage.blob import (
            AccountSasPermissions,
            ContainerSasPermissions,
            ResourceTypes,
            generate_account_sas,
            generate_container_sas,
        )

        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours)
        if container is None:
            return str(
                generate_account_sas(
                    ACCOUNT_NAME,
                    ACCOUNT_KEY,
                    ResourceTypes(service=True, container=True, object=True),
                    AccountSasPermissions(
                        read=True, write=True, delete=True, list=True, add=True, create=True
                    ),
                    expiry,
                )
            )
        permission = ContainerSasPermissions(
            read=True, write=True, delete=True, list=True, add=True, create=True
        )
        return str(
            generate_container_sas(
                ACCOUNT_NAME, container, account_key=ACCOUNT_KEY, permission=permission, expiry=expiry
            )
        )

    def sas_storage_options(self, container: str | None = None) -> dict[str, Any]:
        """adlfs options that reach this server with a SAS token and no account key: scoped to
        ``container`` (requests to other containers are refused), or to the whole account."""
        return {
            "connection_string": (
                f"BlobEndpoint={self.endpoint_url}/{ACCOUNT_NAME};"
                f"SharedAccessSignature={self.sas_token(container)}"
            )
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients configured by variable (adlfs, the Azure SDK)."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def create_bucket(self, name: str) -> str:
        """Create a container (Azure's bucket)."""
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string) as client:
            client.create_container(name)
        return name
