"""The thin edge executor: numpy + onnxruntime (+ tensorrt) + grpcio; never torch."""
