"""A node agent told to shut down answers first: it stops (and closes its
links) only once the reply is on its way."""

import os
import socket
import threading

from harness._native.transport import Link, Op
from harness.nodes.agent import Agent
from harness.nodes.spec import AgentSpec, LinkEnd


def test_shutdown_is_answered_before_the_agent_closes_its_links(tmp_path):
    for i in range(30):  # the race lost about one time in four
        a, b = socket.socketpair()
        end = LinkEnd("controller", "fd", True, fd=os.dup(b.fileno()))
        b.close()
        agent = Agent(AgentSpec(f"node{i}", "mnode", 9, "t", "process", end,
                                data_dir=str(tmp_path)))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        caller = Link.from_fd(a.fileno(), name=f"node{i} control")
        a.close()
        try:
            assert caller.call(Op.SHUTDOWN, timeout=5.0) == b""
            thread.join(5)
            assert not thread.is_alive(), "the agent did not stop after SHUTDOWN"
        finally:
            caller.close()
