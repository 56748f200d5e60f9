"""Per worker: channel -> local members, with exactly one broker subscription per channel.

Three jobs, a module each: the life of a channel's subscription (`hub`), the fan-out of
its messages (`fanout`), and resuming members and filling the worker's own gaps from
history (`resume`).
"""

from service.hub.fanout import Member
from service.hub.hub import Hub
from service.hub.resume import Joined

__all__ = ["Hub", "Joined", "Member"]
