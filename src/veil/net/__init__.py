"""Channels between parties: in-memory (threads) and TCP with mutual TLS; deployments and keys."""

from veil.net.channel import Channel, Stats
from veil.net.deployment import Deployment, Party, load_deployment, write_deployment
from veil.net.keys import create_keys
from veil.net.local import run_local
from veil.net.memory import MemoryChannel, MemoryNetwork
from veil.net.tls import TLSChannel, connect_tls

__all__ = [
    "Channel", "Stats", "MemoryNetwork", "MemoryChannel", "TLSChannel", "connect_tls", "run_local",
    "Deployment", "Party", "load_deployment", "write_deployment", "create_keys",
]
