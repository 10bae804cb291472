"""Ingest: what the data path reports, stored. The gRPC collector (observations from every ext_proc),
the observation store (SQLite), retained response samples, export, and the watch on Envoy's own
counters of responses lockgate did not see."""
