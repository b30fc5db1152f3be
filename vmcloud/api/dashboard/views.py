"""The web dashboard, served by the API under /dashboard: server-rendered pages over the
same services as /v1 (the dispatcher's RPC client, the Identity, the Monitor), a session
cookie instead of a token header, a CSRF token in every form.

The pages work without JavaScript; the scripts (static files: the Content-Security-Policy
allows no inline script or style) only keep the monitoring page and a building
deployment's page current, and draw the charts.
"""
import fastapi
from starlette import datastructures

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api.dashboard import applications
from vmcloud.api.dashboard import clouds
from vmcloud.api.dashboard import csrf
from vmcloud.api.dashboard import deployments
from vmcloud.api.dashboard import forms
from vmcloud.api.dashboard import monitoring
from vmcloud.api.dashboard import pages
from vmcloud.api.dashboard import session

router = pages.router('/dashboard')
Services = context.Services
services_of = fastapi.Depends(context.services)


@router.get('')
def dashboard_root():
    return pages.redirect(session.HOME)


@router.get('/')
def overview(request: fastapi.Request, user: auth.User = fastapi.Depends(session.current_user),
             services: Services = services_of):
    """Each cloud at a glance: its deployments, applications, users, and connections
    against its limit."""
    return pages.render(request, 'overview.html', live=services.monitor.live())


def _logged_in(request: fastapi.Request, services: Services) -> bool:
    """Whether the browser holds a valid session (the login page sends it on then)."""
    try:
        session.current_user(request, services)
    except exception.Unauthorized:
        return False
    return True


@router.get('/login')
def login_page(request: fastapi.Request, next: str | None = None,
               services: Services = services_of):
    if _logged_in(request, services):
        return pages.redirect(session.next_page(next))
    return pages.render(request, 'login.html', username='', next=session.next_page(next),
                        error=None)


@router.post('/login')
def login(request: fastapi.Request, form: datastructures.FormData = fastapi.Depends(
        csrf.checked_form), services: Services = services_of):
    """A session for the user and password of the form, or the form again saying why not
    (the same words for an unknown user and a wrong password)."""
    username = forms.text(form, 'username')
    password = form.get('password')
    target = session.next_page(forms.text(form, 'next'))
    try:
        token = services.identity.login(username, password if isinstance(password, str)
                                        else '', client=auth.client_address(request))
    except exception.LoginThrottled as exc:
        return pages.render(
            request, 'login.html', status=429,
            headers={'Retry-After': str(exc.retry_after)}, username=username, next=target,
            error=f'Too many failed logins: try again in {exc.retry_after} s.')
    except exception.Unauthorized:
        return pages.render(request, 'login.html', status=401,
                            headers={'WWW-Authenticate': 'Token'}, username=username,
                            next=target, error='Wrong user name or password.')
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return pages.render(request, 'login.html', status=status, username=username,
                            next=target, error=message)
    response = pages.redirect(target)
    session.start(response, services.conf, token['id'])
    return response


@router.post('/logout')
def logout(request: fastapi.Request, form: datastructures.FormData = fastapi.Depends(
        csrf.checked_form), services: Services = services_of):
    token = request.cookies.get(session.COOKIE)
    if token:
        services.identity.revoke(token)
    response = pages.redirect(session.LOGIN)
    session.end(response, services.conf)
    return response


router.include_router(clouds.router)
router.include_router(applications.router)
router.include_router(deployments.router)
router.include_router(monitoring.router)
