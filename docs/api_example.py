"""edm2x from Python, run beside the CPU demo's run folder and reference statistics of its kind of data:
python train_edm2.py --outdir=runs/demo --preset=demo
python dataset_tool.py synth --dest=datasets/shapes-32.zip --resolution=32 --max-images=10K
python calculate_metrics.py ref --data=datasets/shapes-32.zip --dest=refs/demo.pkl
"""

import edm2x

net = edm2x.load('runs/demo', device='cpu')  # newest snapshot; also a .pkl/.safetensors file, URL or preset name
images = net.sample(seeds=range(8), solver='heun', num_steps=16)  # uint8 array [8, H, W, C], as generate_images.py
print(net, images.shape)
net.sample(seeds=[0], output='pil')[0].save('api-seed0.png')

ema = edm2x.reconstruct('runs/demo', std=0.08)  # post-hoc EMA of another length, from the run's snapshots
print('FID', edm2x.fid(ema, ref='refs/demo.pkl', num=64, num_steps=16))
