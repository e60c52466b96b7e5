"""What the hive does, without HTTP: one method per operation."""

from __future__ import annotations

from typing import Any

from rbee_common.config import HiveSettings
from rbee_common.errors import InvalidRequest, NotImplementedYet
from rbee_common.jobs import JobContext
from rbee_common.wire import Infer, Operation


class HiveService:
    def __init__(self, settings: HiveSettings) -> None:
        self.settings = settings

    async def handle(self, operation: Operation, context: JobContext) -> Any:
        match operation:
            case Infer():
                raise InvalidRequest(
                    "A hive does not run inference: `infer` reached a hive, which is a "
                    "routing bug in the caller.",
                    code="WRONG_DAEMON",
                    hint="Send inference to the queen; it talks to workers directly.",
                )
            case _:
                raise NotImplementedYet(
                    f"Operation `{operation.name}` is not implemented yet in this hive.",
                    details={"operation": operation.name},
                )
