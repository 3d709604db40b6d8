import sys, types, time, torch, numpy as np, torch.nn.functional as F
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)
sys.path.insert(0,'/work/main')
try:
    import defectscope.backbones as B; B.FeatureExtractor
except Exception:
    fake=types.ModuleType('defectscope.backbones')
    class FE(torch.nn.Module):
        def __init__(self,backbone,layers,weights,pretrained):
            super().__init__(); self.channels=[40,112]; self.layers=['blocks.2','blocks.4']
            self.config=types.SimpleNamespace(mean=(.5,.5,.5),std=(.5,.5,.5)); self.fingerprint='x'; self.weights_source='x'
    fake.FeatureExtractor=FE; sys.modules['defectscope.backbones']=fake
from defectscope.models.supersimplenet import SuperSimpleNet
from defectscope.models.common import upscale_and_concat
import argparse
ap=argparse.ArgumentParser(); ap.add_argument('ct'); ap.add_argument('--size',default=256,type=int)
ap.add_argument('--noise',type=float,default=0.25); ap.add_argument('--epochs',type=int,default=10); ap.add_argument('--bs',type=int,default=32)
ap.add_argument('--up',type=int,default=2); ap.add_argument('--icpr',action='store_true'); ap.add_argument('--nostd',action='store_true')
ap.add_argument('--lrx',type=float,default=1.0); ap.add_argument('--ntrain',type=int,default=0); ap.add_argument('--nn',action='store_true')
ap.add_argument('--seed',type=int,default=0)
a=ap.parse_args()
d=torch.load(f'/tmp/exp/{a.ct}_{a.size}.pt',weights_only=False)
def agg(fs,up):
    h,w=fs[0].shape[-2:]; out=[]
    for i in range(0,len(fs[0]),64):
        out.append(upscale_and_concat([f[i:i+64].float() for f in fs],(h*up,w*up),3).half())
    return torch.cat(out)
tr=agg(d['tr'],a.up); te=agg(d['te'],a.up); lab=d['lab']
if a.ntrain: tr=tr[:a.ntrain]
print('feats',tr.shape,te.shape)
if a.nn:
    t=time.time()
    C=tr.shape[1]; bank=tr.float().permute(0,2,3,1).reshape(-1,C)
    g=torch.Generator().manual_seed(0); bank=bank[torch.randperm(len(bank),generator=g)[:20000]]
    sc=[]
    for x in te.float():
        q=x.permute(1,2,0).reshape(-1,C); dd=torch.cdist(q,bank).min(1).values; sc.append(dd.max().item())
    print('NN auroc',roc_auc_score(lab,sc),time.time()-t); sys.exit()
torch.manual_seed(a.seed)
m=SuperSimpleNet(backbone='efficientnet_lite0',adapt_cls_features=a.icpr,noise_std=a.noise,standardize_features=not a.nostd,upscale_factor=a.up)
m.fit_feature_statistics(tr.float())
opt,sch=m.configure_optimizers(a.epochs)
for g in opt.param_groups: g['lr']*=a.lrx
def evaluate():
    m.eval(); s=[];mx=[]
    with torch.no_grad():
        for i in range(0,len(te),64):
            ml,sl=m.forward_features(te[i:i+64].float(),(a.size,a.size)); s.append(sl.sigmoid()); mx.append(ml.flatten(1).amax(1))
    m.train(); s=torch.cat(s).numpy(); mx=torch.cat(mx).numpy()
    return roc_auc_score(lab,s), roc_auc_score(lab,mx)
t=time.time()
for ep in range(a.epochs):
    perm=torch.randperm(len(tr)); tot=0
    for i in range(0,len(tr),a.bs):
        idx=perm[i:i+a.bs]
        if len(idx)<2: continue
        loss=m.training_step(tr[idx].float()); opt.zero_grad(); loss.backward(); opt.step(); tot+=loss.item()
    sch.step()
    if ep%max(1,a.epochs//5)==0 or ep==a.epochs-1:
        print(f'ep {ep} loss {tot:.3f} auroc(score,mapmax) {evaluate()} t {time.time()-t:.0f}',flush=True)
