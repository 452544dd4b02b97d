"""The five parties of an mpc deployment as functions of a channel (threads or processes alike).

Message flow (each arrow one message; S0/S1 = server0/server1):

setup (once)   owner -> S0 {model, seed}, owner -> S1 {model, W - PRG(seed)}, owner -> dealer/user {model};
               dealer -> S0 seed0, dealer -> S1 seed1; user -> S0 its input seed;
               S0 <-> S1 open ``F = W - B`` for every fixed weight (``B`` from the dealer seeds).
offline        user -> dealer, S0, S1 {query, batch, seg_bytes}; dealer -> S1 corrections, dealer -> S0 ack;
               S0, S1 expand and precompute, then -> user {ready}.
online         user -> S1 its input share (S0's share comes from the user's seed), or, when the
               first layer is masked by the user (``Program.direct``; the dealer sent it ``A``
               offline), user -> S0, S1 ``E = X - A``; S0 <-> S1 run the program;
               S0, S1 -> user output shares.
segments       when the query's material exceeds the user's budget (``Program.segments``), the two
               phases above run once per segment of the program: after segment k's instructions
               S0, S1 -> user {done k}; user -> dealer {segment k+1}; offline as above for that
               segment only; user -> S0, S1 {go k+1}; S0 <-> S1 run its instructions.
end            user -> all {done}; every party -> user its channel counters.
Any party may send {op: abort, reason} instead; the receivers raise :class:`ProtocolError`.
"""

from veil.mpc.roles.dealer import dealer_role
from veil.mpc.roles.owner import owner_role
from veil.mpc.roles.server import server_role
from veil.mpc.roles.user import user_role

__all__ = ["owner_role", "user_role", "server_role", "dealer_role", "PARTIES"]

PARTIES = ("owner", "user", "server0", "server1", "dealer")
