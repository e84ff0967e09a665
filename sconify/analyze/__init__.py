"""The analyzer: what a native image runs (command, program, ELF facts, interpreter, libraries) and a proposal
of how to protect it (regions, enclave settings), read from the image alone without running it."""

from sconify.analyze.analysis import SCHEMA_VERSION, Analysis, ElfFacts, EnclaveProposal, analyze

__all__ = ["SCHEMA_VERSION", "Analysis", "ElfFacts", "EnclaveProposal", "analyze"]
