"""ONNX export for rnndeploy models: standard RNN/LSTM/GRU nodes, state as graph I/O, verification."""
