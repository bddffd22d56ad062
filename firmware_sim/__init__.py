"""Simulated fleets for the demo, the tests and the benchmarks.

Every simulated device runs the real agent (``device_agent.Agent``) with its own MQTT session and
state directory; the simulator only plays the world around it: the camera (clean or drifted digits)
and the ground truth that arrives after a prediction.
"""
