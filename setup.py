"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    'jax>=0.6,<0.13',
    'flax>=0.11,<0.14',
    'optax>=0.2.4,<0.3',
    'chex>=0.1.89,<0.2',
    'clu>=0.0.12,<0.1',  # metric writers: TensorBoard + logging
    'absl-py>=2.1,<3',
    'matplotlib>=3.8,<4',  # ood_jax.plots
    'ml_collections>=1.0,<2',
    'tensorflow-datasets>=4.9.7,<5',
    'orbax-checkpoint>=0.11,<0.13',
    'numpy>=1.26,<3',
    'pillow>=10,<14',  # image folders and scikit-learn's sample photos
    'scikit-learn>=1.4,<2',  # the offline digits benchmark ships inside scikit-learn
    # TFDS needs TensorFlow to read datasets; the CPU build keeps it off the accelerators.
    'tensorflow-cpu>=2.16,<2.22',
    'tensorboard>=2.16,<2.22',  # clu's summary writer
]

EXTRAS_REQUIRE = {
    'test': [
        'pytest>=8,<10',
        'pytest-xdist>=3.5,<4',
        'ruff>=0.8,<1',  # the style check (ruff.toml), run by CI
        'scipy>=1.11,<2',
        'nbclient>=0.9,<1',  # runs colab/ notebooks in smoke mode
        'nbformat>=5.9,<6',
        'ipykernel>=6.25,<8',
    ],
}

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
    license='Apache-2.0',
)
