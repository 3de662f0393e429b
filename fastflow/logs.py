"""Logging set-up shared by the command-line entry points (train, evaluate)."""

from __future__ import annotations

import logging
import os


class _DropMessage(logging.Filter):
    """Drops one known-harmless third-party log line (matched by a substring)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def setup_logging() -> None:
    """Rank-aware: rank 0 logs at INFO, other ranks only warn unless FASTFLOW_LOG_ALL_RANKS=1."""
    # peft imports bitsandbytes, which on AVX512-BF16 CPUs warns at import that the optional PyPI
    # package `kernels` (an accelerated 4-bit matmul fastflow never uses) is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("gemm_4bit_forward"))
    rank = os.environ.get("RANK", "0")
    quiet = rank != "0" and os.environ.get("FASTFLOW_LOG_ALL_RANKS") != "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s %(message)s")
