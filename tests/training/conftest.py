"""Fixtures of the training-side tests: a contract-following HTTP server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.training.contract_server import ContractState, serve


@pytest.fixture
def contract_state() -> ContractState:
    return ContractState()


@pytest.fixture
def contract_server(contract_state: ContractState) -> Iterator[str]:
    with serve(contract_state) as url:
        yield url
