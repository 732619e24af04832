"""The node agent: one Ray actor per node that hosts the node's rank processes (``node_agent.py``)
and the processes it owns (``hosted.py``)."""
