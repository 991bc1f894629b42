"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax."""

import setuptools

# The library core (layers, losses, scores, metrics, calibration, models, methods, detectors):
# `pip install ood_jax` in any Flax project. Everything else is an extra (ood_jax/_extras.py says
# which module needs which, and importing one without its extra says what to install).
INSTALL_REQUIRES = [
    'jax>=0.6,<0.13',
    'flax>=0.11,<0.14',
    'optax>=0.2.4,<0.3',
    'chex>=0.1.89,<0.2',
    'numpy>=1.26,<3',
]

# The trainer, the evaluator and TFDS data, less TensorFlow: what a runtime that ships `tensorflow`
# (Colab) lacks. None of these depends on TensorFlow (TFDS leaves the choice of build to the user).
_TRAINER = [
    'tensorflow-datasets>=4.9.7,<5',
    'orbax-checkpoint>=0.11,<0.13',
    'clu>=0.0.12,<0.1',  # metric writers: TensorBoard + logging
    'ml_collections>=1.0,<2',
    'absl-py>=2.1,<3',
    'pillow>=10,<14',  # image folders, OOD sets and outliers resized on the host
    # TFDS's dataset builders import it through etils, whose 1.15 release no longer installs it.
    'importlib_resources>=6',
]
# TFDS needs TensorFlow to read datasets; the CPU build keeps it off the accelerators. Never installed
# over an existing `tensorflow` (setup.py cannot see what is installed when a wheel is built, so the
# 'colab' extra is the same set without it).
_TENSORFLOW = [
    'tensorflow-cpu>=2.16,<2.22',
    'tensorboard>=2.16,<2.22',  # clu's summary writer
]

EXTRAS_REQUIRE = {
    'train': _TRAINER + _TENSORFLOW,
    'colab': _TRAINER,  # Colab (and any environment with `tensorflow`): train without tensorflow-cpu
    'plots': ['matplotlib>=3.8,<4'],  # ood_jax.plots
    'digits': [
        'scikit-learn>=1.4,<2',  # the offline digits benchmark ships inside scikit-learn
        'pillow>=10,<14',  # scikit-learn's sample photos (the far-OOD set)
    ],
    'test': [
        'pytest>=8,<10',
        'pytest-xdist>=3.5,<4',
        'hypothesis>=6.100,<7',  # property-based tests (tests/test_fuzz.py)
        'ruff>=0.8,<1',  # the style check (ruff.toml), run by CI
        'scipy>=1.11,<2',
        'nbclient>=0.9,<1',  # runs colab/ notebooks in smoke mode
        'nbformat>=5.9,<6',
        'packaging>=23',  # tests/test_install.py reads requirement markers
        'ipykernel>=6.25,<8',
    ],
}
# Everything the CLI, the benchmarks and the figures use (the README installs it with the test tools).
EXTRAS_REQUIRE['all'] = list(dict.fromkeys(
    EXTRAS_REQUIRE['train'] + EXTRAS_REQUIRE['plots'] + EXTRAS_REQUIRE['digits']))

URL = 'https://github.com/ood-jax/ood_jax'  # placeholder: the repository's public URL, once it has one

setuptools.setup(
    name='ood_jax',
    version='0.1.0',
    description='Out-of-distribution detection and calibration under dataset shift in JAX/Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['ood_jax', 'ood_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    url=URL,
    license='Apache-2.0',
)
