"""sista_core.cpu: the allocator setting used by training and the loss benchmark."""

import platform

import pytest
import torch

from sista_core.cpu import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retain_freed_memory_applies_on_glibc_and_is_idempotent():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True
    # Allocation still works, large and small, after the thresholds moved.
    assert torch.ones(64, 64, 196).sum().item() == 64 * 64 * 196
