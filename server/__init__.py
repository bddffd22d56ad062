"""The edgeloop server: registry, sample intake, training jobs, signing and staged rollouts.

Build an application with ``server.main.create_app(settings)``; nothing is created at import time.
"""
