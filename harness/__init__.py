"""What the tests, the behaviour scenarios and the benchmarks share: starting rbee's programs and
reading their jobs (`helpers`), a Hugging Face stand-in on loopback (`fake_hf`), network namespaces
with their own sshd as machines (`netns`, `fleet`), a tiny random MLX model (`tiny_mlx`), and an
NVML stand-in (`standins/pynvml.py`). Never imported by rbee itself."""
