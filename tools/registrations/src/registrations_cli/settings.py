"""The command's settings: the pipeline's environment variables, read exactly as the services
read them (regbridge.settings), with the contract's defaults.

Built once from a mapping (tests pass a dict). Every bad value is named at once, and a URL is
never echoed back: it may hold credentials.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import SecretStr

from regbridge.poll_schedule import LADDER_S
from regbridge.redact import redact_url_value
from regbridge.settings import HttpUrl, PipelineSettings, Schedule, SettingsError
from regbridge.topology import wait_queue_name

from .errors import USAGE, CliError


class CliSettings(PipelineSettings):
    # The broker's management API, in the form the Helm charts' Secret holds it for KEDA:
    # http[s]://user:password@host:port/<vhost, URL-encoded>. Empty: derived from RABBITMQ_URL
    # (`management.target`).
    rabbitmq_management_url_secret: HttpUrl = SecretStr("")

    @property
    def rabbitmq_management_url(self) -> str:
        return self.rabbitmq_management_url_secret.get_secret_value()

    @property
    def wait_queues(self) -> list[str]:
        """The poller's wait queues for the configured delays (the submitter's first hop, then
        the poll interval), and on the adaptive schedule those of its ladder, each named once."""
        delays = [d for d in (self.poll_first_delay_s, self.poll_interval_s) if d > 0]
        if self.poll_schedule is Schedule.ADAPTIVE:
            delays += LADDER_S
        return list(dict.fromkeys(wait_queue_name(self.pending_queue, d) for d in delays))

    @property
    def broker_shown(self) -> str:
        return redact_url_value(self.rabbitmq_url)

    @property
    def mongodb_shown(self) -> str:
        return redact_url_value(self.mongodb_uri)


def from_env(env: Mapping[str, str]) -> CliSettings:
    try:
        return CliSettings.from_env(env)
    except SettingsError as exc:
        raise CliError(str(exc), USAGE) from None
